"""Run the repository's Snakefile through profiles/slurm on the local cluster, and read the jobs back from sacct."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
USER_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
# Per-rule sizes a 2-CPU test node can hold; score_layer's differ from the rest so that sacct can tell them apart.
RULE_RESOURCES = {"cpus_per_task": 1, "mem_mb": 2000, "runtime": 10}
SCORE_LAYER_RESOURCES = {"cpus_per_task": 1, "mem_mb": 1500, "runtime": 7}
# The plugin checks a job `init` s after a round of submissions, then waits 10 s longer after each check that
# finds nothing finished. The tiny jobs take 12-20 s: 6 catches them at the second check (~22 s), 1 at the third.
POLLING = {"slurm-init-seconds-before-status-checks": 6, "seconds-between-status-checks": 1}
SITE_ONLY_RESOURCES = ("gpu_model", "gres", "constraint", "qos", "slurm_extra")  # GPUs and features we lack
SACCT_FIELDS = ("JobID", "JobName", "Comment", "State", "Account", "Partition", "ReqCPUS", "ReqMem", "Timelimit",
                "Submit")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
JOB_HEADER = re.compile(r"^(local)?(rule|checkpoint) (\w+):$")
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def module_from(path: Path, name: str):
    """Import a file of another test folder under a name of its own (test folders are not packages)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The workflow tests' tiny config, shared rather than copied.
_workflow_helpers = module_from(TESTS / "workflow" / "workflow_helpers.py", "hd_workflow_helpers")
tiny_config, with_overrides = _workflow_helpers.tiny_config, _workflow_helpers.with_overrides


def write_test_profile(cluster, folder: Path, **overrides) -> Path:
    """profiles/slurm with only what the test cluster needs changed: account, partition, sizes, no GPUs,
    2 jobs at once and fast polling. `overrides` replace top-level keys (use the profile's spelling)."""
    profile = yaml.safe_load(USER_PROFILE.read_text())
    placement = {"slurm_account": cluster.account, "slurm_partition": cluster.partition, "gpu": 0}
    profile["default-resources"] = {**profile["default-resources"], **placement, **RULE_RESOURCES, "mem_mb": 1000}
    set_resources = {}
    for rule, resources in profile.get("set-resources", {}).items():
        kept = {key: value for key, value in resources.items() if key not in SITE_ONLY_RESOURCES}
        sizes = SCORE_LAYER_RESOURCES if rule == "score_layer" else RULE_RESOURCES
        set_resources[rule] = {**kept, **placement, **sizes}
    profile["set-resources"] = set_resources
    # One thread per job, also for the rules the profile sizes but whose threads the Snakefile sets.
    profile["set-threads"] = {rule: 1 for rule in {**set_resources, **profile.get("set-threads", {})}}
    profile.update({"jobs": 2, "latency-wait": 5, **POLLING, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def snakemake_command(workdir: Path, config: dict, profile: Path, *targets: str) -> list[str]:
    """What a user types (`snakemake --profile ... --configfile ...`), aimed at `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "test-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config_file), "--profile", str(profile), *targets]


def environment(cluster, **extra: str) -> dict[str, str]:
    return {**cluster.env, "HF_HUB_OFFLINE": "1", **extra}


def run_id(controller_output: str) -> str:
    """The plugin names every job of one Snakemake invocation after this ID."""
    match = re.search(r"SLURM run ID: (\S+)", controller_output)
    assert match, f"no SLURM run ID in the controller's output:\n{controller_output[-3000:]}"
    return match.group(1)


def submitted_jobs(controller_output: str) -> list[tuple[str, str]]:
    """(Slurm job id, plugin log path) of every sbatch the controller reported, in order."""
    return SUBMITTED.findall(controller_output)


def planned_jobs(controller_output: str) -> tuple[list[str], list[str]]:
    """(Slurm comments of the jobs Snakemake ran as `rule`, names of those it ran as `localrule`).

    The comment is the plugin's: rule_<rule>, plus _wildcards_<values joined by _> when the rule has wildcards.
    """
    remote, local = [], []
    lines = controller_output.splitlines()
    for index, line in enumerate(lines):
        header = JOB_HEADER.match(line)
        if not header:
            continue
        name = header.group(3)
        if header.group(1):
            local.append(name)
            continue
        values = []
        for detail in lines[index + 1:]:
            if not detail.startswith("    "):
                break
            if detail.startswith("    wildcards: "):
                values = [pair.split("=", 1)[1] for pair in detail.split(": ", 1)[1].split(", ")]
        remote.append(f"rule_{name}_wildcards_{'_'.join(values)}" if values else f"rule_{name}")
    return remote, local


def sacct_rows(cluster, *selection: str, since: datetime) -> list[dict[str, str]]:
    """Allocation-level records (no steps), oldest first."""
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--starttime={since:%Y-%m-%dT%H:%M:%S}", f"--format={','.join(SACCT_FIELDS)}",
         *selection],
        capture_output=True, text=True, env=cluster.env, check=True, timeout=30,
    )
    return [dict(zip(SACCT_FIELDS, line.split("|"))) for line in result.stdout.splitlines() if line]


def settled_rows(cluster, *selection: str, since: datetime, count: int, timeout_s: float = 60):
    """Poll sacct until `count` jobs are in a final state and fully recorded (slurmdbd fills records in steps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sacct_rows(cluster, *selection, since=since)
        settled = len(rows) >= count and all(
            row["State"].split()[0] in FINAL_STATES and row["Partition"] for row in rows)
        if settled or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def queued_jobs(cluster) -> list[str]:
    """`JOBID STATE NAME` of every job squeue still lists."""
    listed = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True, env=cluster.env,
                            timeout=30)
    return listed.stdout.splitlines()
