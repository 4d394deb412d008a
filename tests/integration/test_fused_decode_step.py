"""A linear layer's decode step as one kernel (`HD_GDN_DECODE=fused`, `HD_GLA_DECODE=fused`,
models/mixers/decode_step_triton.py) decodes what the compiled path decodes: checked on CPU with our Triton kernel
under Triton's interpreter, in greedy decoding into fixed-address caches (tests/gpu/test_static_decode_cuda.py
replays it as a CUDA graph)."""
from __future__ import annotations

import pytest
import torch
from fla_interpreter import run_with_fla_interpreted

pytestmark = pytest.mark.integration

CHECK = r"""
import json, os, sys, torch
sys.path.insert(0, TESTS_DIR)
from tiny_models import tiny_teacher
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder
from hybrid_distill.models.student import build_student, mixers_of
from hybrid_distill.models.mixers import decode_step_triton

launches = []
for name in ("gdn_decode_step", "gla_decode_step"):
    def counted(*args, _step=getattr(decode_step_triton, name), **kwargs):
        launches.append(1)
        return _step(*args, **kwargs)
    setattr(decode_step_triton, name, counted)


def hybrid(family, mixer, dtype, options, **shape):
    model = build_student(tiny_teacher(family, **shape), [1], mixer, **options).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():   # live gates, convs, norms: every parameter the kernel reads differs from its init
        for mixer in mixers_of(model).values():
            for name, parameter in mixer.named_parameters():
                if not name.startswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.to(dtype)


def decode(model, prompt, choice, steps=3):   # the second step reads what the first wrote
    os.environ["HD_GDN_DECODE"] = os.environ["HD_GLA_DECODE"] = choice
    launches.clear()
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, steps)
    addresses = [tensor.data_ptr() for tensor in decoder.small_state]
    logits = []
    for _ in range(steps):
        decoder.step()
        logits.append(decoder.last_logits.clone())
    return {"logits": torch.stack(logits), "tokens": decoder.tokens, "launches": len(launches),
            "moved": addresses != [tensor.data_ptr() for tensor in decoder.small_state],
            "deferred": len(decoder.deferred_writes)}


report = {}
cases = {"gdn llama fp32": ("llama", "gdn", torch.float32, {}),
         "gdn qwen2 fp32, output gate, negative eigenvalues": ("qwen2", "gdn", torch.float32,
                                                              dict(use_output_gate=True, allow_neg_eigval=True)),
         "gdn llama fp32, no short conv": ("llama", "gdn", torch.float32, dict(use_short_conv=False)),
         "gdn llama fp32, head size 24": ("llama", "gdn", torch.float32, {}),   # not a power of 2: masked lanes
         "gdn llama bf16": ("llama", "gdn", torch.bfloat16, {}),
         "gla llama fp32": ("llama", "gla", torch.float32, {}),
         "gla qwen2 fp32, output gate, rank 5": ("qwen2", "gla", torch.float32,
                                                 dict(use_output_gate=True, gate_low_rank_dim=5)),
         "gla llama fp32, no short conv, head size 24": ("llama", "gla", torch.float32, dict(use_short_conv=False)),
         "gla llama bf16": ("llama", "gla", torch.bfloat16, {})}
for case, (family, mixer, dtype, options) in cases.items():
    model = hybrid(family, mixer, dtype, options, **({"hidden_size": 96} if "head size 24" in case else {}))
    prompt = torch.randint(model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    compiled, fused = decode(model, prompt, "compiled"), decode(model, prompt, "fused")
    report[case] = {"difference": (compiled["logits"] - fused["logits"]).abs().max().item(),
                    "scale": compiled["logits"].abs().max().item(),
                    "same tokens": bool(torch.equal(compiled["tokens"], fused["tokens"])),
                    "launches": [compiled["launches"], fused["launches"]],
                    "moved": fused["moved"], "deferred": fused["deferred"]}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from pathlib import Path

    tests = f"TESTS_DIR = {str(Path(__file__).parents[1])!r}\n"   # where tiny_models lives
    return run_with_fla_interpreted(tests + CHECK, tmp_path_factory.mktemp("fused_decode"))


@pytest.mark.parametrize("case", ["gdn llama fp32", "gdn qwen2 fp32, output gate, negative eigenvalues",
                                  "gdn llama fp32, no short conv", "gdn llama fp32, head size 24", "gla llama fp32",
                                  "gla qwen2 fp32, output gate, rank 5", "gla llama fp32, no short conv, head size 24"])
def test_fused_step_decodes_what_the_compiled_path_decodes_in_float32(report, case):
    found = report[case]
    # 3 linear layers x 3 steps through the kernel, none without the switch
    assert found["launches"] == [0, 9], found
    assert found["same tokens"], found
    assert found["difference"] <= 2e-6 * max(found["scale"], 1.0), found
    assert not found["moved"] and found["deferred"] == 0, found   # conv caches and states written in place


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_fused_step_keeps_the_eager_roundings_in_bfloat16(report, mixer):
    found = report[f"{mixer} llama bf16"]
    assert found["launches"] == [0, 9] and found["same tokens"], found
    assert found["difference"] <= 0.03 * found["scale"], found


def test_the_step_names_a_buffer_it_cannot_use():
    from hybrid_distill.models.mixers.decode_step_triton import gdn_decode_step, gla_decode_step

    rows = torch.zeros(2, 1, 8)
    heads = torch.zeros(2, 1, 2)
    state = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="contiguous float32"):
        gdn_decode_step(rows, rows, rows, heads, heads, None, None, heads[0, 0], heads[0, 0], state.double(), None,
                        torch.ones(4), 1e-6, 0.5)
    with pytest.raises(ValueError, match=r"^k must be \[batch, 1, 8\]"):
        gdn_decode_step(rows, rows.transpose(0, 2), rows, heads, heads, None, None, heads[0, 0], heads[0, 0], state,
                        None, torch.ones(4), 1e-6, 0.5)
    with pytest.raises(ValueError, match="conv caches must be contiguous"):
        caches = [torch.zeros(2, 3, 8).transpose(1, 2)] * 3
        gdn_decode_step(rows, rows, rows, heads, heads, caches, [torch.zeros(8, 4)] * 3, heads[0, 0], heads[0, 0],
                        state, None, torch.ones(4), 1e-6, 0.5)
    with pytest.raises(ValueError, match=r"decay weight must be a contiguous \[8, rank\]"):
        gla_decode_step(rows, rows, rows, heads, torch.zeros(4, 2), torch.zeros(8), 16.0, None, None, state, None,
                        torch.ones(4), 1e-6, 0.5)
    with pytest.raises(ValueError, match=r"^the low-rank gate must be \[batch, 1, 2\]"):
        gla_decode_step(rows, rows, rows, rows, torch.zeros(8, 2), torch.zeros(8), 16.0, None, None, state, None,
                        torch.ones(4), 1e-6, 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_the_kernel_bench_names_what_it_needs_without_a_gpu(capsys):
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "bench_decode_step.py"))
    with pytest.raises(SystemExit):
        bench["main"](["--warps", "4"])
    assert "run it on a CUDA device" in capsys.readouterr().err
