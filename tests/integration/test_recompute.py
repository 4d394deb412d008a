"""Activation checkpointing of stage 2 (distill/recompute.py): the same loss and gradients, far fewer saved
activations, and unchanged checkpoints."""
import pytest
import torch

from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.distill.recompute import is_recomputed, recompute_decoder_layers
from hybrid_distill.models.student import build_student

pytestmark = pytest.mark.integration


def stage2(teacher, checkpointing: bool):
    torch.manual_seed(0)
    student = build_student(teacher, [1], "gdn")  # a softmax layer among GDN layers
    student.eval()  # stage-2 students may train in eval mode; recomputation must not depend on .training
    return LogitDistillation(student, teacher, 2.0, 16, activation_checkpointing=checkpointing)


def saved_activation_bytes(objective, tokens) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes autograd keeps for backward outside recomputed regions (parameters excluded)."""
    parameters = {p.data_ptr() for p in objective.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = objective(tokens)
    return loss, total


def test_recomputed_stage2_has_the_same_loss_and_gradients_and_saves_far_less(teacher):
    tokens = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    results = {}
    for checkpointing in (False, True):
        objective = stage2(teacher, checkpointing)
        loss, saved = saved_activation_bytes(objective, tokens)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}
        results[checkpointing] = loss.detach(), saved, grads
    (plain_loss, plain_saved, plain_grads), (loss, saved, grads) = results[False], results[True]
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-7), name
    assert saved * 3 < plain_saved, (saved, plain_saved)


def test_recompute_keeps_parameter_names_and_is_idempotent(teacher):
    student = build_student(teacher, [], "gdn")
    names = list(student.state_dict())
    assert recompute_decoder_layers(student) == teacher.config.num_hidden_layers
    assert recompute_decoder_layers(student) == teacher.config.num_hidden_layers
    assert is_recomputed(student) and list(student.state_dict()) == names
    with torch.no_grad():  # held-out scoring: no checkpoint machinery, same outputs
        tokens = torch.randint(0, teacher.config.vocab_size, (1, 16))
        plain = build_student(teacher, [], "gdn")
        plain.load_state_dict(student.state_dict())
        assert torch.equal(student(tokens).logits, plain(tokens).logits)
