"""Interrupting the controller mid-training and rerunning the same command resumes instead of restarting."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from workflow_helpers import REPO, tiny_config

pytestmark = pytest.mark.workflow
TARGET = "results/tiny/gdn/all_linear/stage2/model.safetensors"
STAGE1 = "results/tiny/gdn/all_linear/stage1"


def command(workdir: Path, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config_file), "--cores", "2", "--rerun-incomplete", TARGET]


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def start(workdir: Path, config: dict):
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "test-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return command(workdir, config_file)


def wait_for_state(workdir: Path, min_step: int, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = sorted((workdir / STAGE1 / "state").glob("step_*"))
        if states and int(states[-1].name.split("_")[1]) >= min_step:
            return
        assert process.poll() is None, "the workflow ended before it could be interrupted"
        time.sleep(0.5)
    raise AssertionError("stage 1 never saved a state")


def long_stage1_config(tiny_teacher_dir: Path) -> dict:
    # 96 steps of ~50 ms: after the state of step 4 appears, the job runs for seconds more on an idle machine, so
    # the interrupt lands mid-job even when this process is slow to notice (a loaded machine once let 24 finish).
    return tiny_config(tiny_teacher_dir, **{"distill.stage1": {"tokens": 6144, "lr": 0.001, "micro_batch_size": 2,
                                                                "save_every": 2}})


@pytest.fixture(scope="module")
def reference_dir(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The same command never interrupted: what both resumed runs must reproduce."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    reference = subprocess.run(start(workdir, long_stage1_config(tiny_teacher_dir)), capture_output=True, text=True,
                               env=environment(), timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_and_matches_uninterrupted(interrupt, tiny_teacher_dir, reference_dir, tmp_path):
    resumed_dir = tmp_path / "interrupted"
    argv = start(resumed_dir, long_stage1_config(tiny_teacher_dir))
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(),
                               start_new_session=True)
    wait_for_state(resumed_dir, min_step=4, process=process)
    data_stamp = (resumed_dir / "results/tiny/data/train.json").stat().st_mtime_ns
    os.killpg(process.pid, interrupt)  # the whole session, as a Ctrl-C or a killed login shell would
    process.wait(timeout=120)
    assert not (resumed_dir / STAGE1 / "model.safetensors").exists()
    if interrupt == signal.SIGKILL:  # a killed controller leaves its lock behind; Snakemake's own way out
        subprocess.run(argv + ["--unlock"], capture_output=True, env=environment(), timeout=120, check=True)

    rerun = subprocess.run(argv, capture_output=True, text=True, env=environment(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step" in (resumed_dir / "results/tiny/logs/gdn/distill_all_linear_stage1.log").read_text()
    assert (resumed_dir / "results/tiny/data/train.json").stat().st_mtime_ns == data_stamp  # finished jobs not rerun
    assert "rule prepare_data" not in rerun.stdout + rerun.stderr
    for relative in (f"{STAGE1}/model.safetensors", TARGET):
        expected, got = load_file(reference_dir / relative), load_file(resumed_dir / relative)
        assert expected.keys() == got.keys()
        assert all((expected[k] == got[k]).all() for k in expected), relative
