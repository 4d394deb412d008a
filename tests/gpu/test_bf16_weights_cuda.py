"""On CUDA with fla's kernels, the stage-2 step with bf16 student weights (distill.bf16_weights) computes the loss
and gradients of the float32 step, measured as the autocast step is: against an fp32 eager reference, the bf16
weights may add their own rounding but must stay within a small multiple of autocast's error."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.master_weights import cast_weights
from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_bf16_weights_step_matches_the_float32_step(mixer):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    student = build_student(teacher, [1], mixer).cuda()
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, 512), device="cuda")

    def loss_and_grads(model, autocast: bool):
        objective = LogitDistillation(model, teacher, 1.0, 1024)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = objective(tokens)
        loss.backward()
        return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}

    reference_loss, reference = loss_and_grads(copy.deepcopy(student), autocast=False)
    autocast_loss, autocast_grads = loss_and_grads(copy.deepcopy(student), autocast=True)
    cast_weights(student, torch.bfloat16)
    loss, grads = loss_and_grads(student, autocast=True)

    def error(candidate):
        return max(((candidate[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in reference.items())

    print(f"{mixer}: loss fp32 {reference_loss:.6f}, autocast {autocast_loss:.6f}, bf16 weights {loss:.6f}; worst "
          f"relative gradient error vs fp32: autocast {error(autocast_grads):.2e}, bf16 weights {error(grads):.2e}")
    assert loss == pytest.approx(reference_loss, rel=2e-2)
    assert error(grads) < max(3 * error(autocast_grads), 1e-2)
    assert error(grads) < 0.15
