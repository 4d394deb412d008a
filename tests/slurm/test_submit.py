"""`hybrid-distill submit`: the Snakemake controller as a submitit job, locally and through the cluster's sbatch."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from hybrid_distill import cli
from hybrid_distill.submit import JOB_NAME, add_submit_step, submit_controller
from slurm_workflow import settled_rows

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


def parse_submit(argv: list[str]) -> argparse.Namespace:
    """The `submit` step exactly as the CLI adds it (cli.build_parser will carry it)."""
    parser = argparse.ArgumentParser(prog="hybrid-distill")
    add_submit_step(parser.add_subparsers(dest="step", required=True), cli._add)
    return parser.parse_args(argv)


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return found


def test_local_controller_runs_snakemake_to_completion(tmp_path, monkeypatch, capsys):
    (tmp_path / "Snakefile").write_text(TWO_STEPS.replace("sleep 10", "true"))
    monkeypatch.chdir(tmp_path)
    args = parse_submit(["submit", "--local", "--folder", str(tmp_path / ".submitit"), "--", "--cores", "1"])
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


@pytest.mark.slurm
def test_controller_job_submits_the_workflow_through_sbatch(slurm_cluster, tmp_path, monkeypatch):
    since = datetime.now() - timedelta(seconds=5)
    (tmp_path / "Snakefile").write_text(SMOKE_WORKFLOW.read_text())
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    snakemake_args = [
        "--executor", "slurm", "--jobs", "1", "--default-resources", f"slurm_partition={slurm_cluster.partition}",
        f"slurm_account={slurm_cluster.account}", "runtime=5", "mem_mb=200", *FAST_POLLING,
        "--slurm-jobname-prefix", "hd_submit",
    ]
    job = submit_controller(snakemake_args, folder=tmp_path / ".submitit", partition=slurm_cluster.partition,
                            account=slurm_cluster.account, time_min=10, mem_gb=1, workdir=tmp_path)
    controller = settled_rows(slurm_cluster, f"--jobs={job.job_id}", since=since, count=1, timeout_s=240)
    assert [(row["JobName"], row["State"], row["Account"], row["ReqCPUS"]) for row in controller] == [
        (JOB_NAME, "COMPLETED", slurm_cluster.account, "1")], controller
    assert job.result()["returncode"] == 0
    assert (tmp_path / "results/greeting_upper.txt").read_text() == "HELLO SLURM\n"

    log = job.paths.stderr.read_text()
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    children = settled_rows(slurm_cluster, f"--name={run_id}", since=since, count=2)
    assert sorted(row["Comment"] for row in children) == ["rule_shout_greeting", "rule_write_greeting"], children
    assert {row["State"] for row in children} == {"COMPLETED"}
    assert "running snakemake in a SLURM job context" not in log  # the controller's own allocation is not leaked


@pytest.mark.slurm
def test_preempted_controller_job_is_requeued_and_finishes(slurm_cluster, tmp_path, monkeypatch):
    """Slurm's preemption signals (SIGTERM, then USR2): the controller stops Snakemake, which cancels its job,
    and requeues itself; the second attempt finishes without redoing the finished step."""
    since = datetime.now() - timedelta(seconds=5)
    (tmp_path / "Snakefile").write_text(TWO_STEPS.replace("sleep 10", "sleep 300"))
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    snakemake_args = [
        "--executor", "slurm", "--jobs", "1", "--default-resources", f"slurm_partition={slurm_cluster.partition}",
        f"slurm_account={slurm_cluster.account}", "runtime=5", "mem_mb=200", *FAST_POLLING,
    ]
    job = submit_controller(snakemake_args, folder=tmp_path / ".submitit", partition=slurm_cluster.partition,
                            account=slurm_cluster.account, time_min=10, mem_gb=1, workdir=tmp_path)
    wait_for(lambda: (tmp_path / "started").exists(), "the slow step to start", timeout_s=180)
    first_stamp = (tmp_path / "results/first.txt").stat().st_mtime_ns
    job._interrupt()  # what submitit's own tests use: scancel --signal TERM, then --signal USR2

    def requeued_and_held():
        queued = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], capture_output=True, text=True,
                                env=slurm_cluster.env, timeout=30).stdout.split()
        return queued == ["PENDING", "BeginTime"]

    wait_for(requeued_and_held, "the controller to be requeued", timeout_s=120)
    # Slurm holds a requeued job for about two minutes; let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], env=slurm_cluster.env,
                   check=True, timeout=30)
    wait_for(lambda: job.paths.result_pickle.exists(), "the requeued controller to finish", timeout_s=240)
    result = job.result()
    assert result["returncode"] == 0 and result["attempt"] == 1, result
    assert (tmp_path / "results/second.txt").read_text() == "first\n"
    assert (tmp_path / "results/first.txt").stat().st_mtime_ns == first_stamp
    rows = settled_rows(slurm_cluster, f"--jobs={job.job_id}", since=since, count=1)
    assert rows[0]["State"] == "COMPLETED", rows
    slow_steps = [row for row in settled_rows(slurm_cluster, "--user=root", since=since, count=1)
                  if row["Comment"] == "rule_slow_step"]
    assert sorted(row["State"].split()[0] for row in slow_steps) == ["CANCELLED", "COMPLETED"], slow_steps
