"""Bad configurations and inputs stop with one line naming the problem, before any job, leaving nothing finished."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_helpers import run_snakemake, tiny_config

pytestmark = pytest.mark.workflow


def unsupported_teacher(tmp_path: Path) -> str:
    directory = tmp_path / "gpt2-teacher"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    return str(directory)


def teacher_without_config(tmp_path: Path) -> str:
    directory = tmp_path / "empty-teacher"
    directory.mkdir()
    return str(directory)


# (case id, overrides on the tiny config, text the single error line must contain)
BAD_CONFIGS = [
    ("unknown top-level key", {"foo": 1}, "config: (top level): unknown key ('foo' was unexpected)"),
    ("unknown nested key", {"distill.stage1.foo": 3}, "config: distill.stage1: unknown key"),
    ("wrong type", {"data.seq_len": "long"}, "config: data.seq_len: 'long' is not of type 'integer'"),
    ("ratio zero", {"selection.ratios": [0]}, "config: selection.ratios.0: 0 is less than or equal to the minimum"),
    ("ratio above one", {"selection.ratios": [1.5]}, "config: selection.ratios.0: 1.5 is greater than the maximum of 1"),
    ("racing from no budget", {"scoring.racing.from_fraction": 0},
     "config: scoring.racing.from_fraction: 0 is less than or equal to the minimum"),
    ("K larger than layers", {"selection.ks": [9]}, "selection.ks: K=9 is larger than the teacher's 4 layers"),
    ("user layer out of range", {"selection.selectors": ["user"], "selection.user_layers": [0, 7]},
     "selection.user_layers: layer index 7 is out of range"),
    ("user selector without layers", {"selection.selectors": ["user"]}, "selection.user_layers must list layers"),
    ("unknown mixer", {"mixer.probe": "mamba"}, "config: mixer.probe: 'mamba' is not one of ['gdn', 'gla']"),
    ("unknown final mixer", {"mixer.final": ["rwkv"]}, "config: mixer.final.0: 'rwkv' is not one of"),
    ("unknown selector", {"selection.selectors": ["oracle"]}, "config: selection.selectors.0: 'oracle' is not one of"),
    ("unknown data source", {"data.source": {"kind": "web"}}, "config: data.source.kind: 'web' is not one of"),
    ("files source without globs", {"data.source": {"kind": "files"}}, "config: data.source: 'globs' is a required property"),
    ("negative learning rate", {"distill.stage1.lr": -0.1}, "config: distill.stage1.lr: -0.1 is less than or equal to the minimum of 0"),
    ("stage without tokens", {"distill.stage2": {"lr": 0.1}}, "config: distill.stage2: 'tokens' is a required property"),
    ("early-stop window too small", {"scoring.early_stop.window": 1}, "config: scoring.early_stop.window: 1 is less than the minimum of 2"),
    ("early-stop K too large", {"scoring.early_stop.k": 12}, "scoring.early_stop.k=12 is larger than 4 layers"),
    ("activation memory budget above 1", {"distill.activation_memory_budget": 1.5},
     "config: distill.activation_memory_budget: 1.5 is greater than the maximum of 1"),
    ("budgeted layers zero", {"distill.activation_memory_budget_layers": 0},
     "config: distill.activation_memory_budget_layers: 0 is less than the minimum of 1"),
    ("unknown recall task", {"evaluate.recall_tasks": ["trivia"]}, "config: evaluate.recall_tasks.0: 'trivia' is not one of"),
    ("run name with a slash", {"run": "a/b"}, "config: run: 'a/b' does not match"),
    ("missing teacher file", {"teacher.spec": "/nonexistent/teacher.gguf"}, "teacher.spec: teacher file not found: /nonexistent/teacher.gguf"),
    ("unsupported architecture", {"teacher.spec": unsupported_teacher}, "architecture 'gpt2' is not supported; supported: llama, qwen2"),
    ("teacher directory without config", {"teacher.spec": teacher_without_config}, "has no config.json"),
    ("hub teacher offline without num_layers", {"teacher.spec": "some-org/some-model"}, "set teacher.num_layers"),
]


@pytest.mark.parametrize("case, overrides, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_stops_before_any_job(case, overrides, message, tiny_teacher_dir, tmp_path):
    overrides = {key: value(tmp_path) if callable(value) else value for key, value in overrides.items()}
    config = tiny_config(tiny_teacher_dir, **overrides)
    workdir = tmp_path / "run"
    result = run_snakemake(workdir, config, "-n", timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr  # Snakemake prints its errors on stdout
    error_lines = [line for line in output.splitlines() if message in line]
    assert len(error_lines) == 1, output[-2000:]
    assert not (workdir / "results").exists()


def hybrid_distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_distill.cli", *args], capture_output=True, text=True,
                          timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_corrupt_score_file_is_named_and_nothing_is_written(tmp_path):
    good, bad = tmp_path / "round0_l0.json", tmp_path / "round0_l1.json"
    good.write_text(json.dumps({"heldout_kl": 0.5, "step": 1, "tokens": 32}))
    bad.write_text('{"heldout_kl": 0.')
    out = tmp_path / "importance.csv"
    line = one_error_line(hybrid_distill("rank-layers", "--scores", str(good), str(bad), "--out", str(out)))
    assert f"score file {bad} is corrupt or incomplete" in line
    assert not out.exists()


def test_truncated_checkpoint_is_named_and_no_model_is_written(tiny_teacher_dir, tmp_path):
    checkpoint = tmp_path / "stage1"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((tiny_teacher_dir / name).read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    config["hybrid"] = {"softmax_layers": [0, 1, 2, 3], "mixer": None}
    (checkpoint / "config.json").write_text(json.dumps(config))
    weights = (tiny_teacher_dir / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(tiny_config(tiny_teacher_dir)))
    out = tmp_path / "stage2"
    line = one_error_line(hybrid_distill(
        "distill-stage2", "--config", str(config_file), "--stage", "distill.stage2", "--teacher", str(tiny_teacher_dir),
        "--data", str(tmp_path / "unused"), "--init", str(checkpoint), "--softmax-layers", "none", "--out", str(out)))
    assert "model.safetensors is truncated or corrupt" in line
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("contents, message", [
    (None, "matches no file"),
    ("", "sequences"),
])
def test_empty_or_missing_data_source_is_named(contents, message, tiny_teacher_dir, tmp_path):
    text_file = tmp_path / "corpus.txt"
    if contents is not None:
        text_file.write_text(contents)
    config = tiny_config(tiny_teacher_dir, **{"data.source": {"kind": "files", "globs": [str(text_file)]}})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "data"
    line = one_error_line(hybrid_distill("prepare-data", "--config", str(config_file), "--teacher",
                                         str(tiny_teacher_dir), "--out", str(out)))
    assert message in line and "corpus.txt" in line or str(text_file) in line
    assert not (out / "train.bin").exists() and not (out / "train.json").exists()


def test_missing_config_file_is_named(tmp_path):
    line = one_error_line(hybrid_distill("check-round", "--config", str(tmp_path / "nope.yaml"), "--layers", "2",
                                         "--k", "1", "--max-rounds", "2", "--scores", "a", "b", "--out", "c"))
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in line
