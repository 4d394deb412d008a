"""On CUDA, compiled training layers under bf16 autocast: merged projections (one GEMM forward and backward, or one
GEMM forward with per-projection gradient GEMMs summed by addmm) give HF's separate projections' loss and
gradients, for an all-softmax student with grouped K/V heads and its no-grad teacher."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.compiled_blocks import compile_training_layers
from hybrid_distill.distill.merged_projections import merge_input_projections

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, use_cache=False).logits.float().square().mean()
    loss.backward()
    return loss.detach(), {name: param.grad.float() for name, param in model.named_parameters()}


@pytest.mark.parametrize("choice", ["on", "forward"])
def test_compiled_merged_layers_train_as_separate_projections(choice, monkeypatch):
    torch.manual_seed(0)
    separate = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().train()
    merged = copy.deepcopy(separate)
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", choice)
    assert merge_input_projections(merged) == 2 * SHAPE["num_hidden_layers"]
    for model in (separate, merged):
        compile_training_layers(model)
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, 256), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    want_loss, want_grads = loss_and_grads(separate, tokens)
    loss, grads = loss_and_grads(merged, tokens)
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=0.03 * scale + 1e-8, msg=name)
