"""On CUDA with fla's kernels and bf16 autocast (the training setting), a stage-2 step with activation
checkpointing computes the same loss and gradients as without, and holds less memory at its peak."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


def step(teacher, student_state, tokens, checkpointing: bool):
    """(loss, gradients, peak bytes above the start) of one stage-2 forward and backward."""
    student = build_student(teacher, [2], "gdn").cuda()
    student.load_state_dict(student_state)
    objective = LogitDistillation(student, teacher, 1.0, 1024, activation_checkpointing=checkpointing)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = objective(tokens)
    loss.backward()
    torch.cuda.synchronize()
    grads = {name: p.grad.float() for name, p in student.named_parameters() if p.grad is not None}
    return loss.item(), grads, torch.cuda.max_memory_allocated() - start


def test_checkpointed_step_matches_the_plain_step_with_fla_kernels():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    state = build_student(teacher, [2], "gdn").state_dict()
    tokens = torch.randint(0, SHAPE["vocab_size"], (4, 1024), device="cuda")
    plain_loss, plain_grads, plain_peak = step(teacher, state, tokens, False)
    loss, grads, peak = step(teacher, state, tokens, True)
    print(f"loss {plain_loss:.6f} vs {loss:.6f}; peak {plain_peak / 2**20:.0f} MiB vs {peak / 2**20:.0f} MiB")
    assert loss == pytest.approx(plain_loss, rel=1e-4)
    worst = max(((grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in plain_grads.items())
    assert worst < 2e-2, f"worst relative gradient difference {worst:.2e}"  # bf16 kernels, atomics in backward
    assert peak < 0.7 * plain_peak
