"""distill.activation_memory_budget_layers: the budget's recompute plan reaches the student's first N compiled
layers only. Those layers keep fewer bytes for backward, exactly as many as under the budget everywhere. The
others keep as many as with no budget. The loss and gradients stay the same."""
import pytest
import torch

from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.models.student import build_student, decoder_layers
from tiny_models import tiny_teacher

BUDGET = 0.5
SOFTMAX_LAYERS = [0, 2]  # so that layers 0 and 2 (softmax) and 1 and 3 (GDN) are pairs of one kind


def options(budget: float, budgeted_layers) -> dict:
    return {"temperature": 1.0, "kl_chunk_tokens": 64, "activation_checkpointing": False, "compile_blocks": True,
            "bf16_weights": False, "compile_kl": False, "activation_memory_budget": budget,
            "activation_memory_budget_layers": budgeted_layers, "teacher_stream": False, "teacher_ahead": False}


def step(budget: float, budgeted_layers):
    """(loss, gradients by name, bytes saved for backward by each student layer) of one compiled stage-2 step."""
    torch._dynamo.reset()
    teacher = tiny_teacher("llama", hidden_size=128, intermediate_size=352)
    torch.manual_seed(0)
    student = build_student(teacher, SOFTMAX_LAYERS, "gdn")
    objective = stage2_objective(options(budget, budgeted_layers), student, teacher, "all")
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    saved, current = {}, [None]
    for index, layer in enumerate(decoder_layers(objective.student)):
        layer.register_forward_pre_hook(lambda module, args, index=index: current.__setitem__(0, index))
        layer.register_forward_hook(lambda module, args, output: current.__setitem__(0, None))

    def keep(tensor):
        if current[0] is not None:
            saved[current[0]] = saved.get(current[0], 0) + tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss, _ = objective(input_ids)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in objective.student.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved


@pytest.fixture(scope="module")
def steps():
    budget_before = torch._functorch.config.activation_memory_budget
    try:
        yield {"none": step(1.0, None), "everywhere": step(BUDGET, None), "first_two": step(BUDGET, 2),
               "process_budget_after_layers": torch._functorch.config.activation_memory_budget}
    finally:
        torch._functorch.config.activation_memory_budget = budget_before


def test_the_first_layers_keep_what_the_budget_everywhere_keeps(steps):
    _, _, none = steps["none"]
    _, _, everywhere = steps["everywhere"]
    _, _, first_two = steps["first_two"]
    assert everywhere[0] < none[0] and everywhere[1] < none[1]  # the budget recomputes in both kinds of layer
    assert (first_two[0], first_two[1]) == (everywhere[0], everywhere[1])
    assert (first_two[2], first_two[3]) == (none[2], none[3])
    assert steps["process_budget_after_layers"] == 1.0  # the KL and the teacher keep all: only the layers recompute


def test_the_step_computes_the_same(steps):
    loss, grads, _ = steps["none"]
    budgeted_loss, budgeted_grads, _ = steps["first_two"]
    assert budgeted_loss == pytest.approx(loss, rel=1e-6)
    assert budgeted_grads.keys() == grads.keys()
    for name, grad in budgeted_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
