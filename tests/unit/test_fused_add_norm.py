"""`HD_FUSED_ADD_NORM=on` (distill/fused_add_norm.py): the decoder layers compute HF's function, eager and compiled,
and our Triton kernels (distill/add_norm_triton.py) compute the operator's CPU maths, checked with Triton's
interpreter (tests/gpu/test_fused_add_norm_cuda.py runs them on a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hybrid_distill.distill.compiled_blocks import compile_training_layers
from hybrid_distill.distill.fused_add_norm import SWITCH, add_rms_norm, fuse_add_norms, fused_add_norm_choice
from hybrid_distill.models.mixers import MixerSpec, make_mixer
from hybrid_distill.models.student import decoder_layers

TINY = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64)


def _model(kind: str, linear_layer: bool):
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**TINY)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**TINY)))
    for layer in decoder_layers(model):  # norms that are not all ones, so that their weight matters
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    if linear_layer:  # a student's layer: a linear mixer in the attention's place
        decoder_layers(model)[1].self_attn = make_mixer(MixerSpec(kind="gdn", hidden_size=48, num_heads=4,
                                                                  head_dim=12), 1)
    return model


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    loss = (logits.float().square().mean())
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,linear_layer,compiled", [("llama", False, False), ("qwen2", True, False),
                                                        ("llama", True, True)])
def test_fused_layers_compute_hfs_function_and_gradients(kind, linear_layer, compiled, monkeypatch):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _loss_and_grads(_model(kind, linear_layer), tokens)
    model = _model(kind, linear_layer)
    monkeypatch.setenv(SWITCH, "on")
    assert fuse_add_norms(model) == TINY["num_hidden_layers"]
    calls = []
    real = torch.ops.hybrid_distill.add_rms_norm.default
    if compiled:
        compile_training_layers(model)
    else:  # count the operator's calls (a compiled graph holds its own reference to it)
        monkeypatch.setattr("hybrid_distill.distill.fused_add_norm.add_rms_norm",
                            lambda *args: calls.append(1) or real(*args))
    got_logits, got_grads = _loss_and_grads(model, tokens)
    assert compiled or len(calls) == TINY["num_hidden_layers"]
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_dtypes_keep_hfs_roundings_and_each_inputs_dtype():
    """A float32 residual plus a bf16 attention output, bf16 weight: the sum in float32, the output in float32 as HF's
    norm gives it, each input's gradient in its own dtype."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    reference = LlamaRMSNorm(16, eps=1e-6).to(torch.bfloat16)
    reference.weight = norm.weight
    total = x + a
    want = reference(total)
    y, s, _ = add_rms_norm(x, a, norm.weight, 1e-6)
    assert (y.dtype, s.dtype) == (want.dtype, torch.float32)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    dy = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * dy).sum() + total.sum(), (x, a, norm.weight))
    got_grads = torch.autograd.grad((y * dy).sum() + s.sum(), (x, a, norm.weight))
    for got, want_grad in zip(got_grads, want_grads):
        assert got.dtype == want_grad.dtype
        torch.testing.assert_close(got.float(), want_grad.float(), rtol=2e-2, atol=2e-2)


def test_off_changes_nothing_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    assert fuse_add_norms(_model("llama", False)) == 0
    monkeypatch.setenv(SWITCH, "yes")
    with pytest.raises(ValueError, match="HD_FUSED_ADD_NORM must be on or off, not 'yes'"):
        fused_add_norm_choice()


CHECK = r"""
import json, torch
from hybrid_distill.distill import add_norm_triton
from hybrid_distill.distill.fused_add_norm import add_rms_norm, add_rms_norm_backward

worst = {}
def record(name, got, want):
    worst[name] = max(worst.get(name, 0.0), ((got.float() - want.float()).abs().max()
                                             / (want.float().abs().max() + 1e-30)).item())

generator = torch.Generator().manual_seed(0)
# columns inside one block and ending inside it; rows that fill blocks of 4 and that end inside the last, spread over
# the backward's programs (4 on a CPU) several times; a 3B model's wide rows, one per block. Half precision as float16: the interpreter truncates float32 to
# bfloat16 where a GPU rounds to nearest (the GPU test checks bfloat16)
for rows, columns, dtype, with_ds in [(37, 40, torch.float16, True), (8, 64, torch.float32, False),
                                      (13, 7, torch.float32, True), (5, 3000, torch.float32, True)]:
    x = torch.randn(rows, columns, generator=generator).to(dtype)
    a = torch.randn(rows, columns, generator=generator).to(dtype)
    weight = (1 + 0.3 * torch.randn(columns, generator=generator)).to(dtype)
    want = torch.ops.hybrid_distill.add_rms_norm(x, a, weight, 1e-5)  # the CPU maths
    got = add_norm_triton.add_rms_norm_forward(x, a, weight, 1e-5)
    for name, g, w in zip(("output", "sum", "rstd"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
        record(f"{name} {dtype}", g, w)
    dy = torch.randn(rows, columns, generator=generator).to(dtype)
    ds = torch.randn(rows, columns, generator=generator).to(dtype) if with_ds else None
    want = add_rms_norm_backward(dy, ds, want[1], want[2], weight)
    got = add_norm_triton.add_rms_norm_backward(dy, ds, got[1], got[2], weight)
    for name, g, w in zip(("input grad", "weight grad"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
        record(f"{name} {dtype}", g, w)
print(json.dumps(worst))
"""


def test_triton_kernels_compute_the_operators_cpu_maths():
    environ = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(worst) == 10  # 5 results per dtype
    for name, error in worst.items():  # float16 roundings of float32 sums taken in another order
        assert error < (2e-3 if "float16" in name else 1e-5), (name, error)
