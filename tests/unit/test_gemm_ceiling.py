"""The weight GEMMs of one stage-2 step: three per trained linear, one per frozen, none of a cached teacher's body."""
import torch

from hybrid_distill.distill.gemm_ceiling import Gemm, linear_gemms
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

TOKENS = 24


def linear_weights(model, trained=None):
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear)
               and (trained is None or module.weight.requires_grad is trained))


def test_gemm_flops_are_6n_for_trained_and_2n_for_frozen_weights():
    teacher = tiny_teacher("llama").requires_grad_(False)
    student = build_student(teacher, [0], "gdn")
    student.requires_grad_(False)
    for layer in student.model.layers:
        layer.self_attn.requires_grad_(True)  # scoring.trainable: attention
    gemms = linear_gemms(student, teacher, TOKENS)
    flops = sum(gemm.flops for gemm in gemms)
    expected = TOKENS * (6 * linear_weights(student, True) + 2 * linear_weights(student, False)
                         + 2 * linear_weights(teacher))
    assert flops == expected
    linears = sum(isinstance(m, torch.nn.Linear) for m in (*student.modules(), *teacher.modules()))
    trained = sum(isinstance(m, torch.nn.Linear) and m.weight.requires_grad for m in student.modules())
    assert len(gemms) == linears + 2 * trained


def test_a_cached_teacher_runs_only_its_head():
    teacher = tiny_teacher("llama").requires_grad_(False)
    student = build_student(teacher, [], "gla")
    live = linear_gemms(student, teacher, TOKENS)
    cached = linear_gemms(student, teacher, TOKENS, teacher_body=False)
    vocab, hidden = teacher.lm_head.weight.shape
    assert len(live) - len(cached) == sum(isinstance(m, torch.nn.Linear) for m in teacher.modules()) - 1
    assert cached[-1] == Gemm(TOKENS, hidden, vocab)
