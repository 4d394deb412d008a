"""The tiny run config and a Snakemake runner for workflow tests of the real Snakefile."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {
    "run": "tiny",
    "seed": 0,
    "data": {"source": {"kind": "teacher", "batch_size": 8, "prompts": []}, "seq_len": 32,
             "train_sequences": 16, "heldout_sequences": 4},
    "mixer": {"probe": "gdn", "final": ["gdn"]},
    "distill": {"kl_chunk_tokens": 64,
                "stage1": {"tokens": 256, "lr": 0.001, "micro_batch_size": 2, "save_every": 2},
                "stage2": {"tokens": 128, "lr": 0.0001, "schedule": "constant", "micro_batch_size": 2,
                           "save_every": 1}},
    "scoring": {"stage2": {"tokens": 256, "lr": 0.0001, "schedule": "constant", "micro_batch_size": 2,
                           "save_every": 1},
                "snapshot_every": 1, "heldout_sequences": 2,
                "early_stop": {"enabled": True, "window": 2}},
    "selection": {"ratios": [0.25, 0.5], "selectors": ["ga_s2", "uniform", "random"], "random_seeds": [0],
                  "probe_sequences": 2},
    "evaluate": {"recall_tasks": ["niah_single"], "context_lengths": [128], "num_examples": 2, "batch_size": 2,
                 "efficiency_contexts": [32], "efficiency_batches": [1]},
}


def tiny_config(teacher_dir: Path, **overrides) -> dict:
    return with_overrides({**copy.deepcopy(TINY_CONFIG), "teacher": {"spec": str(teacher_dir)}}, **overrides)


def with_overrides(config: dict, **overrides) -> dict:
    """`config` with dotted keys ("distill.stage1.tokens") set, in place."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def bare_env() -> dict:
    """An offline environment with only this interpreter's PATH and this checkout's library (even in a worktree
    whose interpreter has another checkout installed)."""
    return {"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "PYTHONPATH": str(REPO / "src")}


def run_snakemake(workdir: Path, config: dict, *args: str, timeout: int = 900, env: dict | None = None):
    """Run the repository's Snakefile in `workdir` with `config`; returns the CompletedProcess."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "test-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config_file), "--cores", "2", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env['PATH']}"
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
