"""`distill.compile_kl`: the chunked KL with its per-chunk maths compiled gives the eager loss and gradients
(fp32 and fp64 on CPU; on GPUs under autocast it hands the gradient matmuls bf16, as autocast would)."""
from __future__ import annotations

import pytest
import torch

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden
from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

pytestmark = pytest.mark.integration


def case(dtype, bias: bool, seed=0, tokens=13, dim=6, vocab=37):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (2.0 * torch.randn(*shape, generator=generator)).to(dtype)

    return dict(student_hidden=draw(tokens, dim).requires_grad_(), student_head_weight=draw(vocab, dim).requires_grad_(),
                teacher_hidden=draw(tokens, dim + 1), teacher_head_weight=draw(vocab, dim + 1),
                student_head_bias=draw(vocab).requires_grad_() if bias else None,
                teacher_head_bias=draw(vocab) if bias else None)


def loss_and_grads(inputs, compiled, **options):
    for name in ("student_hidden", "student_head_weight", "student_head_bias"):
        if inputs[name] is not None:
            inputs[name].grad = None
    loss = chunked_kl_from_hidden(**inputs, compiled=compiled, **options)
    loss.backward()
    return loss.detach(), [inputs[name].grad.clone() for name in ("student_hidden", "student_head_weight",
                                                                   "student_head_bias") if inputs[name] is not None]


@pytest.mark.parametrize("dtype, temperature, masked, bias", [
    (torch.float32, 1.0, False, False),
    (torch.float32, 2.0, True, True),
    (torch.float64, 1.5, True, False),
])
def test_compiled_chunks_give_the_eager_loss_and_gradients(dtype, temperature, masked, bias):
    inputs = case(dtype, bias)
    mask = (torch.arange(13) % 3 != 1).to(dtype) * torch.linspace(0.5, 2.0, 13, dtype=dtype) if masked else None
    options = dict(temperature=temperature, chunk_tokens=5, token_mask=mask)  # chunks of 5, 5 and 3 tokens
    eager_loss, eager_grads = loss_and_grads(inputs, compiled=False, **options)
    loss, grads = loss_and_grads(inputs, compiled=True, **options)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert loss.dtype == eager_loss.dtype and torch.allclose(loss, eager_loss, **tolerance)
    assert len(grads) == len(eager_grads) == (3 if bias else 2)
    for grad, eager_grad in zip(grads, eager_grads):
        assert torch.allclose(grad, eager_grad, **tolerance)


def test_compiled_kl_without_grad_gives_the_training_value():
    inputs = case(torch.float32, bias=False)
    with torch.no_grad():
        evaluated = chunked_kl_from_hidden(**inputs, chunk_tokens=4, compiled=True)
    trained, _ = loss_and_grads(inputs, compiled=False, chunk_tokens=4)
    assert torch.allclose(evaluated, trained, rtol=1e-6)


def test_stage2_objective_takes_the_option():
    teacher = tiny_teacher("llama")
    distill = {"temperature": 1.0, "kl_chunk_tokens": 16, "activation_checkpointing": False,
               "compile_blocks": False, "bf16_weights": False, "compile_kl": False,
               "activation_memory_budget": 1.0, "activation_memory_budget_layers": None, "teacher_stream": False,
               "teacher_ahead": False}
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for compile_kl in (False, True):
        objective = stage2_objective({**distill, "compile_kl": compile_kl}, build_student(teacher, [0], "gdn"),
                                     teacher, "all")
        assert objective.compile_kl is compile_kl
        losses[compile_kl] = objective(input_ids)[0].item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
