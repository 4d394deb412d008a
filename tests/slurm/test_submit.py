"""`hybrid-distill submit`: the Snakemake controller as a submitit job, locally and through the cluster's sbatch."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from hybrid_distill import cli
from hybrid_distill.submit import JOB_NAME, submit_controller
from slurm_workflow import queued_jobs, settled_rows

SMOKE_WORKFLOW = Path(__file__).parent / "workflow_smoke" / "Snakefile"
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]
# `slow_step` sleeps only on its first try, so that a controller stopped in it finishes when it comes back. (A
# local Snakemake lets a running job finish after Ctrl-C; a Slurm one cancels it.)
TWO_STEPS = """\
rule all:
    input: "results/second.txt"

rule first_step:
    output: "results/first.txt"
    shell: "echo first > {output}"

rule slow_step:
    input: "results/first.txt"
    output: "results/second.txt"
    shell: "if [ ! -e started ]; then touch started; sleep 10; fi; cat {input} > {output}"
"""


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return found


def test_local_controller_runs_snakemake_to_completion(tmp_path, monkeypatch, capsys):
    (tmp_path / "Snakefile").write_text(TWO_STEPS.replace("sleep 10", "true"))
    monkeypatch.chdir(tmp_path)
    argv = ["submit", "--local", "--folder", str(tmp_path / ".submitit"), "--", "--cores", "1"]
    args = cli.build_parser().parse_args(argv)  # `hybrid-distill submit ...` as the CLI parses it
    assert args.snakemake_args == ["--", "--cores", "1"]
    args.function(args)

    printed = capsys.readouterr().out
    job_id = re.search(r"submitted controller job (\S+)", printed).group(1)
    log_path = Path(re.search(r"log: (\S+)", printed).group(1))
    assert log_path.parent == tmp_path / ".submitit" and job_id in log_path.name
    assert "controller finished: {'returncode': 0, 'attempt': 0" in printed
    assert (tmp_path / "results/second.txt").read_text() == "first\n"
    assert "--rerun-incomplete" in log_path.read_text()  # the controller logs the command it runs


def test_local_controller_requeues_itself_when_signalled(tmp_path):
    """The timeout/preemption path: USR2 -> checkpoint stops Snakemake -> requeued attempt finishes the run."""
    (tmp_path / "Snakefile").write_text(TWO_STEPS)
    job = submit_controller(["--cores", "1"], folder=tmp_path / ".submitit", local=True, workdir=tmp_path)
    wait_for(lambda: (tmp_path / "started").exists(), "the slow step to start")
    first_stamp = (tmp_path / "results/first.txt").stat().st_mtime_ns
    # The local executor's own process does not forward USR2; its task (the controller) is its one child.
    task_pid = int(Path(f"/proc/{job._process.pid}/task/{job._process.pid}/children").read_text().split()[0])
    os.kill(task_pid, signal.SIGUSR2)  # what Slurm sends before a timeout (submitit asks for it with --signal)
    result = job.result()
    assert result["returncode"] == 0 and result["attempt"] == 1, result
    assert (tmp_path / "results/second.txt").read_text() == "first\n"
    assert (tmp_path / "results/first.txt").stat().st_mtime_ns == first_stamp  # finished work is not redone
    log = job.paths.stderr.read_text()
    assert "stopping snakemake" in log and "Requeued job" in log, log[-3000:]


@contextmanager
def controller_job(cluster, workdir: Path, snakemake_args: list[str]):
    """The controller submitted for `workdir`; cancelled with its jobs if the test ends before it does."""
    job = submit_controller(
        ["--executor", "slurm", "--jobs", "1", "--default-resources", f"slurm_partition={cluster.partition}",
         f"slurm_account={cluster.account}", "runtime=5", "mem_mb=200", *FAST_POLLING, *snakemake_args],
        folder=workdir / ".submitit", partition=cluster.partition, account=cluster.account, time_min=10, mem_gb=1,
        workdir=workdir)
    try:
        yield job
    finally:
        if not job.paths.result_pickle.exists():  # leave no job holding one of the test node's two CPUs
            job.cancel(check=False)
            for run in run_ids(job):
                subprocess.run(["scancel", f"--name={run}"], env=cluster.env, timeout=30)


def log_tail(job, lines: int = 30) -> str:
    stderr = job.paths.stderr
    return "\n".join(stderr.read_text().splitlines()[-lines:]) if stderr.exists() else "(no log yet)"


def run_ids(job) -> list[str]:
    """The SLURM run ID of every Snakemake the controller started (one per attempt)."""
    log = job.paths.stderr.read_text() if job.paths.stderr.exists() else ""
    return re.findall(r"SLURM run ID: (\S+)", log)


@pytest.mark.slurm
def test_controller_job_submits_the_workflow_through_sbatch(slurm_cluster, tmp_path, monkeypatch):
    since = datetime.now() - timedelta(seconds=5)
    (tmp_path / "Snakefile").write_text(SMOKE_WORKFLOW.read_text())
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    with controller_job(slurm_cluster, tmp_path, ["--slurm-jobname-prefix", "hd_submit"]) as job:
        controller = settled_rows(slurm_cluster, f"--jobs={job.job_id}", since=since, count=1, timeout_s=420)
        # Read while the job may still run: on a timeout the message says what it was waiting for.
        situation = f"{controller}\nqueue: {queued_jobs(slurm_cluster)}\ncontroller log tail:\n{log_tail(job)}"
    assert [(row["JobName"], row["State"], row["Account"], row["ReqCPUS"]) for row in controller] == [
        (JOB_NAME, "COMPLETED", slurm_cluster.account, "1")], situation
    assert job.result()["returncode"] == 0
    assert (tmp_path / "results/greeting_upper.txt").read_text() == "HELLO SLURM\n"

    [run] = run_ids(job)
    assert run.startswith("hd_submit_")
    children = settled_rows(slurm_cluster, f"--name={run}", since=since, count=2)
    assert sorted(row["Comment"] for row in children) == ["rule_shout_greeting", "rule_write_greeting"], children
    assert {row["State"] for row in children} == {"COMPLETED"}
    assert "running snakemake in a SLURM job context" not in job.paths.stderr.read_text()  # no leaked allocation


@pytest.mark.slurm
def test_preempted_controller_job_is_requeued_and_finishes(slurm_cluster, tmp_path, monkeypatch):
    """Slurm's preemption signals (SIGTERM, then USR2): the controller stops Snakemake, which cancels its job,
    and requeues itself; the second attempt finishes without redoing the finished step."""
    since = datetime.now() - timedelta(seconds=5)
    (tmp_path / "Snakefile").write_text(TWO_STEPS.replace("sleep 10", "sleep 300"))
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    with controller_job(slurm_cluster, tmp_path, []) as job:
        wait_for(lambda: (tmp_path / "started").exists(), "the slow step to start", timeout_s=180)
        first_stamp = (tmp_path / "results/first.txt").stat().st_mtime_ns
        job._interrupt()  # what submitit's own tests use: scancel --signal TERM, then --signal USR2

        def requeued_and_held():
            queued = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], capture_output=True,
                                    text=True, env=slurm_cluster.env, timeout=30).stdout.split()
            return queued == ["PENDING", "BeginTime"]

        wait_for(requeued_and_held, "the controller to be requeued", timeout_s=120)
        # Slurm holds a requeued job for about two minutes; let it start now. Not in the same second as the
        # requeue: slurmd refuses a launch credential issued no later than the second it revoked the first
        # attempt's ("Job credential revoked"), and the job then ends instead of starting.
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], env=slurm_cluster.env,
                       check=True, timeout=30)
        wait_for(job.paths.result_pickle.exists, "the requeued controller to finish", timeout_s=240)
    result = job.result()
    assert result["returncode"] == 0 and result["attempt"] == 1, result
    assert (tmp_path / "results/second.txt").read_text() == "first\n"
    assert (tmp_path / "results/first.txt").stat().st_mtime_ns == first_stamp
    controller = settled_rows(slurm_cluster, f"--jobs={job.job_id}", since=since, count=1)
    assert controller[0]["State"] == "COMPLETED", controller
    first_run, second_run = run_ids(job)
    stopped = settled_rows(slurm_cluster, f"--name={first_run}", since=since, count=2)
    assert sorted((row["Comment"], row["State"].split()[0]) for row in stopped) == [
        ("rule_first_step", "COMPLETED"), ("rule_slow_step", "CANCELLED")], stopped
    finished = settled_rows(slurm_cluster, f"--name={second_run}", since=since, count=1)
    assert [(row["Comment"], row["State"]) for row in finished] == [("rule_slow_step", "COMPLETED")]
