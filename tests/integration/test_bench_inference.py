"""scripts/bench_inference.py at a tiny shape on CPU: both models timed, compiled alike, and profiled."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inference.py"
TINY = ["hidden_size=64", "intermediate_size=128", "num_hidden_layers=4", "num_attention_heads=4",
        "num_key_value_heads=2", "head_dim=16", "vocab_size=256"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_models_get_the_same_compile_and_a_profile(tmp_path, monkeypatch):
    """Sessions 14-28 compiled the hybrid's softmax attention for decoding but not the teacher's."""
    from hybrid_distill.distill import compiled_blocks
    compiled = []
    monkeypatch.setattr(compiled_blocks, "compile_student", lambda model: compiled.append(model) or 0)
    out = tmp_path / "bench.json"
    load_script().main(["--contexts", "16", "--batches", "2", "--decode-tokens", "2", "--compile",
                        "--profile-top", "3", "--shape", *TINY, "--out", str(out)])
    result = json.loads(out.read_text())
    assert [type(model).__name__ for model in compiled] == ["LlamaForCausalLM", "LlamaForCausalLM"]
    assert compiled[0] is not compiled[1]
    assert list(result["rows"]) == list(result["profiles"]) == ["teacher", "hybrid_K1"]
    assert all(rows[0]["decode_tok_s"] > 0 for rows in result["rows"].values())
    assert all(len(profile["top"]) == 3 for profile in result["profiles"].values())


def test_compiled_decoding_on_a_gpu_is_timed_graphed_only(monkeypatch, capsys):
    """HF's eager loop recompiles every compiled attention layer at every token: the bench refuses it, in one line."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(SystemExit) as stop:
        load_script().main(["--compile", "--decode", "both"])
    assert stop.value.code == 2
    assert "--compile times graphed decoding only (--decode graph)" in capsys.readouterr().err
