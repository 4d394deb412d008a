"""`hybrid-distill submit`: run the Snakemake controller itself as a long, light Slurm job (through submitit).

The controller submits the workflow's jobs as usual. On timeout or preemption Slurm signals it, it stops
Snakemake cleanly (Snakemake cancels its running jobs) and submitit requeues it; the next attempt resumes
because finished outputs exist and training jobs pick up their saved states.

    hybrid-distill submit --partition cpu --account me -- --profile profiles/slurm --configfile configs/x.yaml
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

log = logging.getLogger(__name__)

DEFAULT_FOLDER = Path(".submitit")
JOB_NAME = "hybrid-distill-controller"
STOP_GRACE_S = 60  # submitit signals 90 s before the time limit; Snakemake must cancel its jobs within that
# Variables that describe the controller's own allocation; child jobs must not inherit them.
KEEP_SLURM_VARIABLES = {"SLURM_CONF"}


class SnakemakeController(submitit.helpers.Checkpointable):
    """Runs `snakemake --rerun-incomplete <args>` in `workdir`; on checkpoint, stops it and requeues itself."""

    def __init__(self, snakemake_args: list[str], workdir: Path):
        self.snakemake_args = list(snakemake_args)
        self.workdir = Path(workdir)
        self.attempt = 0
        self._process: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "snakemake", "--rerun-incomplete", *self.snakemake_args, *extra]

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("SLURM_") or name in KEEP_SLURM_VARIABLES}
        if self.attempt or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0):
            # A previous attempt may have been killed before it removed Snakemake's lock on the directory.
            subprocess.run(self.command("--unlock"), cwd=self.workdir, env=env, check=False)
        log.info("controller attempt %d in %s: %s", self.attempt, self.workdir, " ".join(self.command()))
        # Slurm signals every process of the step; only this process may react to the checkpoint signal.
        self._process = subprocess.Popen(self.command(), cwd=self.workdir, env=env,
                                         preexec_fn=_ignore_checkpoint_signals)
        while (returncode := self._process.poll()) is None:  # not wait(): checkpoint() must be able to reap it
            time.sleep(1)
        self._process = None
        if returncode != 0:
            raise RuntimeError(f"snakemake exited with status {returncode} (attempt {self.attempt}); "
                               "its output is in this job's log")
        return {"returncode": returncode, "attempt": self.attempt, "workdir": str(self.workdir)}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Interrupt Snakemake as Ctrl-C would (it cancels its jobs and unlocks), then requeue this controller."""
        process = self._process
        if process is not None and process.returncode is None:
            log.warning("stopping snakemake (pid %d) before requeue", process.pid)
            process.send_signal(signal.SIGINT)
            if not _reaped(process.pid, STOP_GRACE_S):
                log.warning("snakemake did not stop within %d s; killing it", STOP_GRACE_S)
                process.kill()
        self.attempt += 1
        return super().checkpoint(*args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_process"] = None  # a live process handle cannot travel in the requeued pickle
        return state


def _reaped(pid: int, timeout_s: float) -> bool:
    """Wait for a child to exit without Popen, whose own wait may be the call this signal handler interrupted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.2)
    return False


def _ignore_checkpoint_signals():
    for checkpoint_signal in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(checkpoint_signal, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's `&` ignores it, but it is how checkpoint() stops Snakemake


def submit_controller(snakemake_args: list[str], *, folder: Path = DEFAULT_FOLDER, local: bool = False,
                      partition: str | None = None, account: str | None = None, time_min: int = 1440,
                      mem_gb: int = 4, workdir: Path | None = None) -> submitit.Job:
    """Submit the controller: one CPU, `mem_gb`, `time_min` per attempt, requeued at each timeout."""
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if local else None)
    if not local and executor.cluster != "slurm":
        raise RuntimeError("no Slurm found here (sbatch is not on PATH); use --local to run the controller "
                           "on this machine")
    executor.update_parameters(name=JOB_NAME, timeout_min=time_min, cpus_per_task=1, mem_gb=mem_gb,
                               slurm_partition=partition, slurm_account=account)
    controller = SnakemakeController(snakemake_args, Path(workdir or Path.cwd()).absolute())
    return executor.submit(controller)


def step_submit(args):
    snakemake_args = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    job = submit_controller(snakemake_args, folder=args.folder, local=args.local, partition=args.partition,
                            account=args.account, time_min=args.time_min, mem_gb=args.mem_gb)
    print(f"submitted controller job {job.job_id}")
    print(f"log: {job.paths.stderr} (Snakemake's output; {job.paths.stdout.name} holds the rest)")
    if args.wait or args.local:  # a local controller shares this terminal's fate: wait for it
        result = job.result()
        print(f"controller finished: {result}")


def add_submit_step(steps, add):
    p = add(steps, "submit", step_submit,
            "run the Snakemake controller as a requeued Slurm job; Snakemake arguments follow `--`")
    p.add_argument("--partition", default=None, help="partition of the controller job (default: the site's)")
    p.add_argument("--account", default=None, help="account charged for the controller job")
    p.add_argument("--time-min", type=int, default=1440, help="minutes per attempt; it is requeued after each")
    p.add_argument("--mem-gb", type=int, default=4, help="memory of the controller job")
    p.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="submitit's job folder (logs, pickles)")
    p.add_argument("--local", action="store_true", help="run the controller on this machine (submitit local)")
    p.add_argument("--wait", action="store_true", help="wait for the controller to finish")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="arguments passed to snakemake, after --")
