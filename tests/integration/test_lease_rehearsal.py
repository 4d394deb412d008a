"""The GPU machine's bench scripts, rehearsed on the CPU: every command they would run parses with the real parsers
and every pytest selection picks tests (scripts/gpu/rehearse.py), so a lease never spends a call on a typo."""
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_SCRIPTS = ROOT / "scripts" / "gpu"
BY_PART = ("untimed_changes.sh", "bench_step_profile.sh", "bench_weight_precision.sh", "bench_kernel_cache.sh")
WHOLE = ("bench_stage2_options.sh", "bench_two_gpus.sh", "bench_shared_gpu.sh")  # scripts that take no part names


def _rehearse_module():
    spec = importlib.util.spec_from_file_location("rehearse", GPU_SCRIPTS / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_parts(script: str) -> list[str]:
    """The part names of a script's `case` (its labels, `a|b)` giving two)."""
    labels = re.findall(r"^ +([a-z][a-z0-9_]*(?:\|[a-z][a-z0-9_]*)*)\)", (GPU_SCRIPTS / script).read_text(), re.M)
    return [part for label in labels for part in label.split("|")]


def rehearse_part(script: str, part: str | None, records: Path, out: Path) -> subprocess.CompletedProcess:
    # HOME too: bench_kernel_cache.sh clears its caches under $HOME before each case
    env = {**os.environ, "HD_REHEARSE": str(records), "OUT": str(out), "HOME": str(out.parent / "home")}
    return subprocess.run(["bash", str(GPU_SCRIPTS / script), *([part] if part else [])], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_scripts_list_their_parts():
    assert {"conv_tests", "kl_rows", "decode_in_place"} <= set(script_parts("untimed_changes.sh"))
    assert {"kl", "short", "short_graph", "budget_gdn", "kl_triton"} <= set(script_parts("bench_step_profile.sh"))
    assert {"cold", "shared", "default_new_node", "eager"} <= set(script_parts("bench_kernel_cache.sh"))


def test_every_command_of_the_gpu_scripts_would_run(tmp_path, capsys):
    """Each part of every bench script (the whole script where it has no parts) records at least one command and
    runs none (no bench JSON, no log with output); then every record passes the checks a lease would otherwise meet
    the hard way."""
    records = tmp_path / "records.jsonl"
    out = tmp_path / "out"
    runs = [(script, part) for script in BY_PART for part in script_parts(script)]
    runs += [(script, None) for script in WHOLE]
    for script, part in runs:
        before = len(records.read_text().splitlines()) if records.exists() else 0
        done = rehearse_part(script, part, records, out)
        assert done.returncode == 0, (script, part, done.stderr)
        assert len(records.read_text().splitlines()) > before, f"{script} {part} recorded no command"
    assert not list(out.rglob("*.json"))
    assert all(log.stat().st_size == 0 for log in out.rglob("*.log"))
    failed = _rehearse_module().check(records)
    report = capsys.readouterr().out
    assert failed == 0, "\n".join(line for line in report.splitlines() if line.startswith("FAILED"))
    kinds = {json.loads(line)["kind"] for line in records.read_text().splitlines()}
    assert kinds == {"bench", "tests", "script"}


MISTAKES = {
    "a mistyped flag": ({"kind": "bench", "args": ["--cuda-graphs"], "switches": {}}, "--cuda-graphs"),
    "micro-batches that do not divide the batch": (
        {"kind": "bench", "args": ["--batch-size", "64", "--micro-batches", "3"], "switches": {}}, "micro_batches=3"),
    "a switch value the library refuses": (
        {"kind": "bench", "args": [], "switches": {"HD_KL_ROWS": "trition"}}, "HD_KL_ROWS must be"),
    "a mistyped switch name": ({"kind": "bench", "args": [], "switches": {"HD_KL_ROW": "triton"}}, "HD_KL_ROW is not"),
    "a mixer switch value": (
        {"kind": "bench", "args": [], "switches": {"HD_CONV_KERNELS": "row"}}, "HD_CONV_KERNELS must be"),
    "a pytest selection of nothing": (
        {"kind": "tests", "args": ["tests/unit/test_layer_sets.py", "-k", "no_test_is_named_so"], "switches": {}},
        "pytest selects no test"),
    "arguments to a script that takes none": (
        {"kind": "script", "args": [str(GPU_SCRIPTS / "bench_short_conv.py"), "--fast"], "switches": {}},
        "takes no arguments"),
    "a script flag": (
        {"kind": "script", "args": [str(ROOT / "scripts" / "bench_inference.py"), "--context-len", "8192"],
         "switches": {}}, "--context-len"),
    "a part the script lacks": (
        {"kind": "unknown_part", "args": ["scripts/gpu/bench_step_profile.sh", "kl_trition"], "switches": {}},
        "bench_step_profile.sh has no part 'kl_trition'"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_check_names_each_kind_of_mistake(mistake, tmp_path, capsys):
    entry, named = MISTAKES[mistake]
    good = {"kind": "bench", "args": ["--students", "gdn", "--cuda-graph"], "switches": {"HD_KL_ROWS": "triton"}}
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps(record) for record in (good, entry)) + "\n")
    assert _rehearse_module().check(records) == 1
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("ok: HD_KL_ROWS=triton bench")
    assert second.startswith("FAILED: ") and named in second


def test_an_unknown_part_fails_the_rehearsal(tmp_path):
    records = tmp_path / "records.jsonl"
    done = rehearse_part("bench_step_profile.sh", "kl_trition", records, tmp_path / "out")
    assert done.returncode == 2
    assert json.loads(records.read_text())["kind"] == "unknown_part"
