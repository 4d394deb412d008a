"""profile_decode_step: per-step figures of a few decode steps, for the teacher and a hybrid alike (CPU: ATen ops)."""
import pytest
import torch

from hybrid_distill.evaluate.decode_profile import profile_decode_step
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

PROMPT = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hybrid", [False, True])
def test_figures_are_per_step_and_the_top_ops_are_the_longest(hybrid):
    model = tiny_teacher("llama")
    if hybrid:
        model = build_student(model, softmax_layers=[0], mixer="gdn").eval()
    one, three = (profile_decode_step(model, PROMPT, top=4, steps=steps) for steps in (1, 3))
    assert one["launches"] == three["launches"] > 0   # the same ops every step, counted once per step
    assert [kernel["ms"] for kernel in three["top"]] == sorted((kernel["ms"] for kernel in three["top"]), reverse=True)
    assert len(three["top"]) == 4
    assert sum(group["ms"] for group in three["groups"]) == pytest.approx(three["device_ms"])
    assert three["wall_ms"] > 0
    names = {kernel["name"] for kernel in profile_decode_step(model, PROMPT, top=100, steps=1)["top"]}
    assert ("aten::linalg_solve_triangular" in names) == hybrid   # GDN's CPU path; the teacher has none


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="need steps >= 1 and top >= 0, got 0 and 3"):
        profile_decode_step(tiny_teacher("llama"), PROMPT, top=3, steps=0)
