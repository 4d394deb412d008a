"""On CUDA: our add-and-norm Triton kernels compute the operator's CPU maths in bf16 at SmolLM2's width, and compiled
training layers with the fused operator (HD_FUSED_ADD_NORM=on, with and without merged projections) give HF's loss
and gradients under bf16 autocast, for an all-softmax student and its no-grad teacher."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill import add_norm_triton
from hybrid_distill.distill.compiled_blocks import compile_training_layers
from hybrid_distill.distill.fused_add_norm import add_rms_norm_backward, fuse_add_norms
from hybrid_distill.distill.merged_projections import merge_input_projections
from compiled_training import assert_same_training, loss_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=1024)


@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_kernels_compute_the_operators_maths(residual_dtype):
    generator = torch.Generator().manual_seed(0)
    rows, columns = 4099, 576  # the last block of rows part-filled
    x = torch.randn(rows, columns, generator=generator).to(residual_dtype)
    a = torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(columns, generator=generator)).to(torch.bfloat16)
    dy = torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
    ds = torch.randn(rows, columns, generator=generator).to(residual_dtype)
    want = torch.ops.hybrid_distill.add_rms_norm(x, a, weight, 1e-5)  # CPU maths
    got = add_norm_triton.add_rms_norm_forward(x.cuda(), a.cuda(), weight.cuda(), 1e-5)
    for name, g, w in zip(("output", "sum", "rstd"), got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g.cpu().float(), w.float(), rtol=1e-2, atol=1e-2, msg=name)
    want_grads = add_rms_norm_backward(dy, ds, want[1], want[2], weight)
    got_grads = add_norm_triton.add_rms_norm_backward(dy.cuda(), ds.cuda(), got[1], got[2], weight.cuda())
    for name, g, w in zip(("input grad", "weight grad"), got_grads, want_grads):
        scale = w.float().abs().max().item()
        torch.testing.assert_close(g.cpu().float(), w.float(), rtol=0, atol=0.01 * scale, msg=name)


@pytest.mark.parametrize("merged", ["off", "on"])
def test_compiled_fused_layers_train_as_hfs(merged, monkeypatch):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().train()
    for layer in plain.model.layers:
        torch.nn.init.normal_(layer.post_attention_layernorm.weight, 1.0, 0.3)
    fused = copy.deepcopy(plain)
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", merged)
    monkeypatch.setenv("HD_FUSED_ADD_NORM", "on")
    merge_input_projections(fused)
    assert fuse_add_norms(fused) == SHAPE["num_hidden_layers"]
    for model in (plain, fused):
        compile_training_layers(model)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, 256), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    assert_same_training(loss_and_grads(fused, tokens), loss_and_grads(plain, tokens))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the teacher's forward-only variant
        torch.testing.assert_close(fused(tokens).logits.float(), plain(tokens).logits.float(), rtol=0.05, atol=0.05)
