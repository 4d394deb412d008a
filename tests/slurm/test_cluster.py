"""The local cluster runs real batch jobs, and Snakemake's Slurm executor turns each rule into one of them."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

SMOKE_WORKFLOW = Path(__file__).parent / "workflow_smoke" / "Snakefile"
# The plugin waits 40 s before its first status check by default; these keep the smoke run near 30 s.
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]


def sacct_rows(cluster, *selection: str, since: datetime) -> list[dict[str, str]]:
    """Allocation-level sacct records (no job steps) as dicts, oldest first."""
    fields = ["JobID", "JobName", "Comment", "State", "Account", "Partition"]
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--starttime={since:%Y-%m-%dT%H:%M:%S}", f"--format={','.join(fields)}",
         *selection],
        capture_output=True, text=True, env=cluster.env, check=True, timeout=30,
    )
    return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line]


def settled_sacct_rows(cluster, *selection: str, since: datetime, count: int, timeout_s: float = 60):
    """Poll sacct until `count` jobs are finished and fully recorded.

    slurmdbd fills a record in several messages: a quick job can read COMPLETED before its Partition is set.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sacct_rows(cluster, *selection, since=since)
        settled = len(rows) == count and all(
            row["State"] not in {"PENDING", "RUNNING", "COMPLETING"} and row["Partition"] for row in rows
        )
        if settled or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_sbatch_job_completes_and_is_accounted(slurm_cluster, tmp_path):
    since = datetime.now() - timedelta(minutes=1)
    marker = tmp_path / "marker.txt"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--partition={slurm_cluster.partition}", f"--account={slurm_cluster.account}",
         "--time=1", "--mem=100", f"--output={tmp_path / 'job.log'}", f"--wrap=echo ran on $(hostname) > {marker}"],
        capture_output=True, text=True, env=slurm_cluster.env, check=True, timeout=30,
    )
    job_id = submitted.stdout.strip().split(";")[0]

    rows = settled_sacct_rows(slurm_cluster, f"--jobs={job_id}", since=since, count=1)
    assert [row["State"] for row in rows] == ["COMPLETED"], rows
    assert rows[0]["Account"] == slurm_cluster.account and rows[0]["Partition"] == slurm_cluster.partition
    assert marker.read_text().startswith("ran on ")


def test_snakemake_submits_each_rule_as_a_slurm_job(slurm_cluster, tmp_path):
    since = datetime.now() - timedelta(minutes=1)
    shutil.copy(SMOKE_WORKFLOW, tmp_path / "Snakefile")
    command = [
        sys.executable, "-m", "snakemake", "--executor", "slurm", "--jobs", "2",
        "--default-resources", f"slurm_partition={slurm_cluster.partition}",
        f"slurm_account={slurm_cluster.account}", "runtime=5", "mem_mb=200",
        *FAST_POLLING, "--slurm-jobname-prefix", "hd_smoke",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=slurm_cluster.env, timeout=150)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "results" / "greeting_upper.txt").read_text() == "HELLO SLURM\n"

    # The plugin names every job of one run after the run ID and puts the rule into the comment.
    run_id = re.search(r"SLURM run ID: (\S+)", run.stderr).group(1)
    assert run_id.startswith("hd_smoke_")
    rows = settled_sacct_rows(slurm_cluster, f"--name={run_id}", since=since, count=2)
    assert sorted(row["Comment"] for row in rows) == ["rule_shout_greeting", "rule_write_greeting"], rows
    assert {(row["State"], row["Account"], row["Partition"]) for row in rows} == {
        ("COMPLETED", slurm_cluster.account, slurm_cluster.partition)
    }
