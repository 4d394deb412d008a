"""On CUDA, compiled training layers under bf16 autocast: merged projections (one GEMM forward and backward, or one
GEMM forward with per-projection gradient GEMMs summed by addmm) give HF's separate projections' loss and
gradients, for an all-softmax student with grouped K/V heads and its no-grad teacher."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.compiled_blocks import compile_training_layers
from hybrid_distill.distill.merged_projections import merge_input_projections
from compiled_training import assert_same_training, loss_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)


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
    assert_same_training(loss_and_grads(merged, tokens), loss_and_grads(separate, tokens))
