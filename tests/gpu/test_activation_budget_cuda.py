"""On CUDA, distill.activation_memory_budget below 1 changes what a compiled stage-2 step keeps for backward, not
what it computes: the same loss and gradients as the full budget (bf16 rounding apart), from fewer saved bytes."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.config.load import validate_config
from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


def step(teacher, budget: float, budgeted_layers=None):
    """(loss, gradients by name, bytes saved for backward) of one compiled stage-2 step under `budget` (in the
    student's first `budgeted_layers` layers only, if given)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = build_student(teacher, [1], "gdn").cuda()
    distill = {**validate_config({})["distill"], "kl_chunk_tokens": 1024, "compile_blocks": True,
               "compile_kl": True, "bf16_weights": True, "activation_memory_budget": budget,
               "activation_memory_budget_layers": budgeted_layers,
               "teacher_ahead": False}  # one step, called directly: the teacher on its own batch
    objective = stage2_objective(distill, student, copy.deepcopy(teacher), "all").cuda()
    batch = torch.randint(0, SHAPE["vocab_size"], (4, 512), device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's context
        objective(batch)[0].backward()  # the compile, outside the count
    objective.zero_grad(set_to_none=True)
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = objective(batch)
    loss.backward()
    grads = {name: p.grad.float() for name, p in objective.student.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


def test_a_smaller_budget_saves_less_and_trains_the_same():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    full_loss, full_grads, full_bytes = step(teacher, 1.0)
    loss, grads, saved_bytes = step(teacher, 0.5)
    torch._functorch.config.activation_memory_budget = 1.0
    assert saved_bytes < 0.9 * full_bytes
    assert loss == pytest.approx(full_loss, rel=1e-3)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_a_budget_in_half_the_layers_saves_between_none_and_all():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    full_loss, full_grads, full_bytes = step(teacher, 1.0)
    _, _, everywhere_bytes = step(teacher, 0.5)
    loss, grads, half_bytes = step(teacher, 0.5, budgeted_layers=SHAPE["num_hidden_layers"] // 2)
    torch._functorch.config.activation_memory_budget = 1.0
    assert everywhere_bytes < half_bytes < full_bytes
    assert loss == pytest.approx(full_loss, rel=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=5e-2, atol=5e-3, msg=name)
