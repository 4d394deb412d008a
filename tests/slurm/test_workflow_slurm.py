"""The real Snakefile through the user's Slurm profile: every rule a Slurm job, failures resumed, cancels survived."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from slurm_workflow import (
    REPO, SCORE_LAYER_RESOURCES, USER_PROFILE, environment, planned_jobs, run_id, settled_rows, snakemake_command,
    submitted_jobs, tiny_config, with_overrides, write_test_profile,
)

STAGE1 = "results/tiny/gdn/all_linear/stage1"
STAGE1_LOG = "results/tiny/logs/gdn/distill_all_linear_stage1.log"
STAGE1_COMMENT = "rule_distill_all_linear_stage1_wildcards_gdn"
LOCAL_RULES = {"write_run_config", "write_config_slice", "check_early_stop", "rank_layers", "write_early_stop",
               "select_layers", "make_report", "all"}
TEACHER_EFFICIENCY = "results/tiny/efficiency/teacher.json"
# One selector and one scoring round keep the end-to-end run near 17 Slurm jobs on a 2-CPU node.
SMALL_RUN = {"selection.selectors": ["ga_s2"], "selection.ratios": [0.5],
             "scoring.stage2.tokens": 128, "scoring.snapshot_every": 2}
# Stage-1 steps with a state after each (50 ms a step on an idle 2-CPU node, 130 ms loaded): the cancel test sees
# the first state within a second of it and has 30 s or more to scancel the job before it ends; the resumed job
# finishes the rest (about 75 s loaded). A step is micro_batch_size 2 x seq_len 32 tokens in the tiny config.
STAGE1_STEPS = 600
LONG_STAGE1 = {"distill.stage1.tokens": STAGE1_STEPS * 2 * 32, "distill.stage1.save_every": 1}


def since_now() -> datetime:
    return datetime.now() - timedelta(seconds=5)


def assert_ok(run: subprocess.CompletedProcess):
    assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-5000:]}"


@pytest.mark.slurm
def test_tiny_workflow_runs_every_rule_as_a_slurm_job(slurm_cluster, tiny_teacher_dir, tmp_path):
    since = since_now()
    profile = write_test_profile(slurm_cluster, tmp_path / "profile")
    workdir = tmp_path / "run"
    command = snakemake_command(workdir, tiny_config(tiny_teacher_dir, **SMALL_RUN), profile)
    run = subprocess.run(command, capture_output=True, text=True, env=environment(slurm_cluster), timeout=900)
    assert_ok(run)
    assert (workdir / "results/tiny/report.md").exists()
    # the jobs on the cluster keep compiled kernels in the workflow's shared kernel cache
    inductor = environment(slurm_cluster).get("TORCHINDUCTOR_CACHE_DIR") or \
        str(workdir / "results/.kernel_cache/inductor")
    assert f"TORCHINDUCTOR_CACHE_DIR={inductor}," in (workdir / STAGE1_LOG).read_text()

    remote, local = planned_jobs(run.stderr)
    assert set(local) == LOCAL_RULES  # these ran in the controller, not on the cluster
    rows = settled_rows(slurm_cluster, f"--name={run_id(run.stderr)}", since=since, count=len(remote))
    comments = Counter(row["Comment"] for row in rows)
    assert comments == Counter(remote), (comments, remote)  # one Slurm job per rule instance, and no more
    assert len(rows) == len(submitted_jobs(run.stderr))
    assert not {comment.split("_wildcards_")[0][len("rule_"):] for comment in comments} & LOCAL_RULES
    scored = {f"rule_score_layer_wildcards_gdn_{path.parent.name[len('layer'):]}_{path.stem[len('round'):]}"
              for path in (workdir / "results/tiny/gdn/swap").glob("layer*/round*.json")}
    assert len(scored) == 4 and scored <= set(comments)  # every layer of the 4-layer teacher, one round
    assert {(row["State"], row["Account"], row["Partition"]) for row in rows} == {
        ("COMPLETED", slurm_cluster.account, slurm_cluster.partition)}, rows

    # set-resources of the profile reach sbatch: score_layer's CPUs, memory and time limit differ from the rest.
    minutes = SCORE_LAYER_RESOURCES["runtime"]
    for row in rows:
        if row["Comment"].startswith("rule_score_layer_"):
            expected = (str(SCORE_LAYER_RESOURCES["cpus_per_task"]), f"{SCORE_LAYER_RESOURCES['mem_mb']}M",
                        f"{minutes // 60:02d}:{minutes % 60:02d}:00")
            assert (row["ReqCPUS"], row["ReqMem"], row["Timelimit"]) == expected, row
        else:
            assert row["ReqMem"] != f"{SCORE_LAYER_RESOURCES['mem_mb']}M", row


@pytest.fixture(scope="module")
def prepared_run(slurm_cluster, tiny_teacher_dir, tmp_path_factory) -> Path:
    """A run whose teacher and data were prepared on the cluster; the stage-1 tests each start from a copy."""
    folder = tmp_path_factory.mktemp("prepared")
    profile = write_test_profile(slurm_cluster, folder / "profile", retries=0)
    command = snakemake_command(folder / "run", tiny_config(tiny_teacher_dir, **LONG_STAGE1), profile,
                                "results/tiny/data/train.bin", "results/tiny/data/heldout.bin")
    assert_ok(subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(slurm_cluster)))
    return folder


def copy_of(prepared: Path, tmp_path: Path, *targets: str, **overrides) -> tuple[Path, list[str]]:
    """The prepared run copied (timestamps and Snakemake's records kept), and the command aimed at the copy, with
    the config's dotted keys `overrides` changed (only the jobs that read them rerun)."""
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder, symlinks=True)
    config = with_overrides(yaml.safe_load((folder / "run" / "test-config.yaml").read_text()), **overrides)
    return folder / "run", snakemake_command(folder / "run", config, folder / "profile", *targets)


@pytest.mark.slurm
def test_failed_training_job_is_reported_and_resumed_without_resubmitting_finished_jobs(
        slurm_cluster, prepared_run, tmp_path):
    workdir, command = copy_of(prepared_run, tmp_path, f"{STAGE1}/model.safetensors", TEACHER_EFFICIENCY,
                               **{"distill.stage1.tokens": 8 * 2 * 32})  # 8 steps: the rerun finishes them

    since = since_now()
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=environment(slurm_cluster, HD_FAIL_AT_STEP="1"))
    assert failed.returncode != 0
    assert "Error in rule distill_all_linear_stage1" in failed.stderr, failed.stderr[-3000:]
    first = settled_rows(slurm_cluster, f"--name={run_id(failed.stderr)}", since=since, count=2)
    assert {row["Comment"]: row["State"] for row in first} == {
        STAGE1_COMMENT: "FAILED", "rule_measure_teacher_efficiency": "COMPLETED"}, first  # keep-going

    since = since_now()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(slurm_cluster))
    assert_ok(rerun)
    second = settled_rows(slurm_cluster, f"--name={run_id(rerun.stderr)}", since=since, count=1)
    assert [(row["Comment"], row["State"]) for row in second] == [(STAGE1_COMMENT, "COMPLETED")], second
    assert "resumed from step 1 " in (workdir / STAGE1_LOG).read_text()


# Bounds of the waits in the cancel test; each wait ends as soon as its condition holds. A loaded 2-CPU node may take
# minutes to start torch in a job; the plugin lengthens its polling interval by 10 s after every check that finds
# nothing finished, up to 180 s, so noticing the cancel can take that long.
SUBMIT_TIMEOUT_S = 300
STATE_TIMEOUT_S = 600
NOTICE_TIMEOUT_S = 420
FINISH_TIMEOUT_S = 900


def wait_for(condition, what: str, process: subprocess.Popen, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert process.poll() is None, f"the workflow ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)
    return found


def saved_steps(workdir: Path) -> list[int]:
    """Steps of the complete stage-1 states on disk (the trainer keeps the latest; staging dirs start with '.')."""
    return sorted(int(path.name[len("step_"):]) for path in (workdir / STAGE1 / "state").glob("step_*"))


@pytest.mark.slurm
def test_cancelled_training_job_resumes_when_resubmitted(slurm_cluster, prepared_run, tmp_path):
    """scancel mid-run: Snakemake sees the job fail, resubmits it (the profile's `retries: 1`), and the new job
    resumes from the state the cancelled one saved; jobs that finished are not run again, then or on a rerun."""
    workdir, command = copy_of(prepared_run, tmp_path, f"{STAGE1}/model.safetensors", TEACHER_EFFICIENCY)
    profile = write_test_profile(slurm_cluster, workdir.parent / "profile")  # the user's retries, not retries=0
    assert yaml.safe_load((profile / "config.yaml").read_text())["retries"] == 1
    data = sorted((workdir / "results/tiny/data").iterdir())
    data_mtimes = [path.stat().st_mtime_ns for path in data]
    controller_log = tmp_path / "controller.log"
    env = environment(slurm_cluster)

    since = since_now()
    with open(controller_log, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def stage1_job():
            return next((job for job, log_path in submitted_jobs(controller_log.read_text())
                         if "/rule_distill_all_linear_stage1/" in log_path), None)

        job_id = wait_for(stage1_job, "the stage-1 job to be submitted", process, SUBMIT_TIMEOUT_S)
        seen = wait_for(lambda: saved_steps(workdir), "stage 1 to save a state", process, STATE_TIMEOUT_S)[-1]
        subprocess.run(["scancel", job_id], env=env, check=True, timeout=60)
        try:
            returncode = process.wait(timeout=NOTICE_TIMEOUT_S + FINISH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            output = controller_log.read_text()
            if f"SLURM-job '{job_id}' failed" not in output:
                pytest.fail(f"Snakemake did not notice the cancelled job {job_id}. sacct shows it as 'CANCELLED by "
                            "<uid>', which snakemake-executor-plugin-slurm 2.8.0 does not count as failed (it "
                            "matches 'CANCELLED' exactly) and so waits forever; squeue shows 'CANCELLED'. The "
                            "profile needs `slurm-status-command: squeue`.")
            pytest.fail(f"the resubmitted stage-1 job did not finish in time:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: Snakemake cancels its jobs and exits
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    output = controller_log.read_text()
    assert returncode == 0, output[-5000:]
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in output, output[-3000:]

    rows = settled_rows(slurm_cluster, f"--name={run_id(output)}", since=since, count=3)
    states = [(row["Comment"], row["JobID"] == job_id, row["State"].split()[0]) for row in rows]
    assert sorted(states) == sorted([
        (STAGE1_COMMENT, True, "CANCELLED"), (STAGE1_COMMENT, False, "COMPLETED"),
        ("rule_measure_teacher_efficiency", False, "COMPLETED")]), (
        "only the cancelled job may run twice (a first stage-1 job COMPLETED means it ended before the scancel: "
        "raise STAGE1_STEPS)", rows)
    resumed = re.search(r"resumed from step (\d+) ", (workdir / STAGE1_LOG).read_text())
    assert resumed, (workdir / STAGE1_LOG).read_text()[-3000:]
    assert seen <= int(resumed.group(1)) < STAGE1_STEPS  # the state of the cancelled job, not a fresh start
    assert (workdir / STAGE1 / "model.safetensors").exists()
    assert [path.stat().st_mtime_ns for path in data] == data_mtimes  # the prepared data were not remade

    efficiency_mtime = (workdir / TEACHER_EFFICIENCY).stat().st_mtime_ns
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert_ok(rerun)
    assert not submitted_jobs(rerun.stderr), rerun.stderr[-3000:]  # nothing left to do
    assert (workdir / TEACHER_EFFICIENCY).stat().st_mtime_ns == efficiency_mtime


def plan_paper_run(profile: Path, directory: Path) -> dict[str, list[dict[str, str]]]:
    """A dry run of the paper config; `--cores` above every thread count, else the plan shows `--threads 1`."""
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(profile), "-n", "--cores", "1024",
         "--configfile", "configs/paper-qwen2.5-3b.yaml", "--directory", str(directory)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**environment_without_slurm(), "HF_HUB_OFFLINE": "1"},
    )
    assert_ok(run)
    return job_blocks(run.stdout + run.stderr)


def test_paper_config_plans_with_the_user_profile(tmp_path):
    """The cluster plan needs no cluster: a dry run shows each rule with the profile's resources."""
    profile = yaml.safe_load(USER_PROFILE.read_text())
    blocks = plan_paper_run(USER_PROFILE.parent, tmp_path)
    for rule in ("score_layer", "distill_all_linear_stage1"):
        wanted = profile["set-resources"][rule]
        assert blocks.get(rule), f"no {rule} job in the plan"
        resources = blocks[rule][0]["resources"]
        for key in ("gpu", "slurm_partition", "runtime", "mem_mb", "cpus_per_task"):
            assert f"{key}={wanted[key]}" in resources.split(", "), (key, resources)
        assert f"accelerate launch --num_processes {wanted['gpu']} " in blocks[rule][0]["shell"]
    assert "gpu=1" in blocks["score_layer"][0]["resources"].split(", ")

    # Every cluster job's command takes as many threads as Slurm gives it CPUs (set-threads = cpus_per_task).
    local = {name for path in (REPO / "rules").glob("*.smk")
             for line in path.read_text().splitlines() if line.startswith("localrules:")
             for name in line.split(":", 1)[1].replace(",", " ").split()}
    checked = set()
    for rule, jobs in blocks.items():
        threads = re.search(r" --threads (\d+) ", jobs[0].get("shell", ""))
        if rule in local or not threads:
            continue
        cpus = re.search(r"cpus_per_task=(\d+)", jobs[0]["resources"]).group(1)
        assert threads.group(1) == cpus, f"{rule}: --threads {threads.group(1)} but cpus_per_task={cpus}; " \
                                         "make set-threads in profiles/slurm/config.yaml agree"
        checked.add(rule)
    assert {"prepare_teacher", "prepare_data", "make_recall_data", "distill_all_linear_stage1",
            "score_layer", "evaluate_model"} <= checked, checked


def test_an_accelerate_config_in_the_profile_reaches_the_launch_line(tmp_path):
    """FSDP without editing rules: a training rule's `accelerate_config` resource becomes `--config_file`."""
    profile = yaml.safe_load(USER_PROFILE.read_text())
    fsdp = str(USER_PROFILE.parent / "accelerate-fsdp.yaml")
    profile["set-resources"]["score_layer"] = {**profile["set-resources"]["score_layer"], "accelerate_config": fsdp}
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    blocks = plan_paper_run(tmp_path / "profile", tmp_path / "run")
    gpus = profile["set-resources"]["score_layer"]["gpu"]
    assert all(job["shell"].startswith(f"accelerate launch --num_processes {gpus} --config_file {fsdp} -m ")
               for job in blocks["score_layer"]), blocks["score_layer"][0]["shell"]
    assert " --config_file " not in blocks["distill_all_linear_stage1"][0]["shell"]


def environment_without_slurm() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}


def job_blocks(output: str) -> dict[str, list[dict[str, str]]]:
    """Snakemake's printed jobs by rule: each a dict of its indented fields plus `shell` (the command)."""
    blocks: dict[str, list[dict[str, str]]] = {}
    current = None
    for line in output.splitlines():
        if header := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            current = {}
            blocks.setdefault(header.group(1), []).append(current)
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            current[key] = value
        elif current is not None and line.startswith("Shell command: "):
            current["shell"] = line[len("Shell command: "):]
            current = None
    return blocks
