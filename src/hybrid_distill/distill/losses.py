"""The two distillation objectives: stage-1 hidden-state alignment and stage-2 KL on the output distribution."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden as kl_distillation_loss

__all__ = ["hidden_alignment_loss", "kl_distillation_loss"]


def hidden_alignment_loss(
    student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]
) -> tuple[Tensor, list[float]]:
    """Stage 1 (paper eq. 4): Σ_l (1/T) ‖U_T^(l) − U_S^(l)‖², per-token squared L2 averaged over batch and tokens.

    Returns the float32 total (with graph; teacher states are detached targets) and the per-layer values as
    floats, which the GA-S1 selector and the logs read.
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"hidden_alignment_loss got {len(student_states)} student layers "
                         f"but {len(teacher_states)} teacher layers")
    if not student_states:
        raise ValueError("hidden_alignment_loss got no layers")
    per_layer = []
    for layer, (student, teacher) in enumerate(zip(student_states, teacher_states)):
        if student.shape != teacher.shape:
            raise ValueError(f"layer {layer}: student state {tuple(student.shape)} "
                             f"!= teacher state {tuple(teacher.shape)}")
        difference = student.float() - teacher.detach().float()
        per_layer.append(difference.pow(2).sum(dim=-1).mean())
    stacked = torch.stack(per_layer)
    return stacked.sum(), stacked.detach().tolist()
