"""The `slurm_cluster` fixture: a real one-node Slurm with accounting, started once per session or reused."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_cluster import (  # noqa: E402
    ACCOUNT, CLUSTER_NAME, PARTITION, ClusterError, LocalCluster, missing_requirements,
)
from slurm_workflow import queued_jobs  # noqa: E402


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to submit work: names to pass to sbatch/Snakemake and the environment to run them in."""

    partition: str
    account: str
    cluster_name: str
    root: Path
    env: dict[str, str] = field(repr=False)
    startup_seconds: float


@pytest.fixture(scope="session")
def slurm_cluster():
    problems = missing_requirements()
    if problems:
        pytest.skip(f"local Slurm unavailable: {'; '.join(problems)}")
    cluster = LocalCluster()
    began = time.monotonic()
    try:
        started = cluster.start()
    except ClusterError as error:
        pytest.skip(f"local Slurm did not start: {error}")
    # Children (sbatch, sacct, Snakemake) inherit SLURM_CONF; jobs read /etc/slurm/slurm.conf, which start() links.
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    # Put this interpreter's bin first so that Snakemake inside a Slurm job is the one running the tests.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    yield SlurmCluster(
        partition=PARTITION, account=ACCOUNT, cluster_name=CLUSTER_NAME, root=cluster.root,
        env={**os.environ, "PATH": path}, startup_seconds=time.monotonic() - began,
    )
    if previous_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous_conf
    if started:
        cluster.stop()


@pytest.fixture(autouse=True)
def idle_queue(request):
    """Every Slurm test starts on an empty queue: a job left by an earlier test would hold one of the node's CPUs
    and keep this test's jobs pending until its timeout, failing it for a reason that is not its own."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("slurm_cluster")
    if leftovers := queued_jobs(cluster):
        subprocess.run(["scancel", f"--partition={cluster.partition}"], env=cluster.env, timeout=30)
        deadline = time.monotonic() + 60
        while queued_jobs(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not queued_jobs(cluster), f"jobs of an earlier test stay in the queue after scancel: {leftovers}"
    yield

