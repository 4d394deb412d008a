"""Cache size is what the design promises: a teacher's KV cache grows with the context, a linear layer's state does
not, and a hybrid pays K/L of the teacher plus the linear states. No timing is asserted (benchmarks do that)."""
import json

import pytest
import torch
from tiny_models import tiny_config, tiny_teacher

from hybrid_distill.evaluate.efficiency import measure_inference, write_efficiency
from hybrid_distill.evaluate.loading import resolve_dtype
from hybrid_distill.models.checkpoint import save_hybrid
from hybrid_distill.models.student import build_student

pytestmark = pytest.mark.integration

CONTEXTS = [16, 40]
BATCHES = [1, 3]
FLOAT32_BYTES = 4


def cache_bytes(model) -> dict[tuple[int, int], int]:
    rows = measure_inference(model, CONTEXTS, BATCHES, decode_tokens=2, warmup=0, repeats=1, device="cpu")
    return {(row["context"], row["batch"]): row["cache_bytes"] for row in rows}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_teacher_cache_is_the_kv_cache(family):
    config = tiny_config(family)
    head_dim = config.hidden_size // config.num_attention_heads
    measured = cache_bytes(tiny_teacher(family))
    for (context, batch), nbytes in measured.items():
        assert nbytes == (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * batch
                          * FLOAT32_BYTES)


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_linear_state_is_constant_in_context_and_hybrid_pays_k_over_l(mixer):
    teacher = tiny_teacher("llama")
    layers = teacher.config.num_hidden_layers
    teacher_bytes = cache_bytes(teacher)
    linear_bytes = cache_bytes(build_student(teacher, [], mixer))
    for batch in BATCHES:
        assert linear_bytes[(CONTEXTS[0], batch)] == linear_bytes[(CONTEXTS[1], batch)] > 0
    for softmax_layers in ([1], [0, 3]):
        hybrid_bytes = cache_bytes(build_student(teacher, softmax_layers, mixer))
        k = len(softmax_layers)
        for key, nbytes in hybrid_bytes.items():
            assert nbytes * layers == k * teacher_bytes[key] + (layers - k) * linear_bytes[key]


def test_rows_and_file(tmp_path):
    teacher = tiny_teacher("llama")
    model_dir = save_hybrid(build_student(teacher, [2], "gdn"), tmp_path / "hybrid")
    out_json = tmp_path / "efficiency" / "hybrid.json"
    returned = write_efficiency(model_dir, out_json, CONTEXTS, BATCHES, decode_tokens=3, warmup=1, repeats=2,
                                device="cpu", extra={"model": "tiny", "kind": "hybrid", "k": 1})
    written = json.loads(out_json.read_text())
    assert written == returned and [p.name for p in out_json.parent.iterdir()] == ["hybrid.json"]
    assert written["model_dir"] == str(model_dir) and written["model"] == "tiny" and written["k"] == 1
    assert [(row["context"], row["batch"]) for row in written["rows"]] == [(c, b) for c in CONTEXTS for b in BATCHES]
    for row in written["rows"]:
        assert row["prefill_s"] > 0 and row["decode_tok_s"] > 0 and row["cache_bytes"] > 0
        assert row["peak_mem_bytes"] is None  # CPU: only CUDA reports a peak
    assert written["dtype"] == "float32"  # "auto" on CPU; the file names the dtype actually measured


@pytest.mark.parametrize(("dtype", "device", "expected"), [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.bfloat16), ("float32", "cuda", torch.float32),
    ("bfloat16", "cpu", torch.bfloat16), (torch.float16, "cpu", torch.float16),
])
def test_auto_dtype_is_bfloat16_only_on_a_gpu(dtype, device, expected):
    """A GPU run measured in float32 reports twice the real cache bytes and a slower decode than users get."""
    assert resolve_dtype(dtype, torch.device(device)) == expected


def test_unknown_dtype_names_the_value():
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_inference(tiny_teacher("llama"), [8], [1], repeats=0)
