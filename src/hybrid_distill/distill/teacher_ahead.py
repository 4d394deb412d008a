"""The live teacher one micro-batch ahead (`distill.teacher_ahead`): each stage-2 micro-step takes its teacher
states from the micro-step before and starts the teacher's forward on the next micro-batch, on a side stream.

Why: with `teacher_stream` the teacher's forward may overlap only the student's forward, since the KL needs it.
One micro-batch ahead it may run beside the student's whole forward and backward, and at a lower priority than the
student's stream (a graphed step's, `STUDENT_STREAM_PRIORITY`) its blocks fill what the student's kernels leave idle
rather than compete with them. The same values: the teacher is frozen, so its states for a batch do not depend on
when they are computed. Costs: one more teacher forward per job (the batch after the last step) and two buffers of
final hidden states. On CPU the next micro-batch's teacher runs in line, through the same buffers.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

# CUDA: lower is more urgent; the side stream keeps the default, 0, the least urgent
STUDENT_STREAM_PRIORITY = -1
PRIORITY_SWITCH = "HD_TEACHER_AHEAD_PRIORITY"  # "low" (the default): the teacher below the student; "equal"


def student_stream_priority() -> int:
    """The priority a graphed step's stream takes when the teacher runs ahead (HD_TEACHER_AHEAD_PRIORITY)."""
    choice = os.environ.get(PRIORITY_SWITCH, "low")
    if choice not in ("low", "equal"):
        raise ValueError(f"{PRIORITY_SWITCH} must be 'low' or 'equal', got {choice!r}")
    return STUDENT_STREAM_PRIORITY if choice == "low" else 0


def graphed_step_priority(objective) -> int:
    """The priority of the stream a graphed step of `objective` runs on: above the teacher's side stream when the
    objective runs the teacher ahead, else CUDA's default."""
    return student_stream_priority() if getattr(objective, "reads_following_ids", False) else 0


class TeacherAhead:
    """`take(ids)` returns the teacher's final hidden states for ids: those the last `start` computed (it checks
    that it was started on the same ids, outside graph capture) or, on a job's first micro-step, computed in line.
    `start(ids)` queues the teacher on ids; `join()` makes the current stream wait for it: a step calls it at its
    end, so that a CUDA graph's capture ends with every stream joined."""

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor]):
        self.compute = compute  # ids -> the teacher's final hidden states
        self.stream: torch.cuda.Stream | None = None
        self.pending: torch.Tensor | None = None  # written by start, on the side stream
        self.pending_ids: torch.Tensor | None = None
        self.current: torch.Tensor | None = None  # what the micro-step's KL reads while start overwrites pending
        # whether the side stream has work the current stream has not waited for: a capture must not wait on work
        # queued before it (CUDA refuses a dependency on uncaptured work), and the step before it ended joined
        self.unjoined = False

    def take(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return self.compute(input_ids)
        self.join()
        if not _capturing(input_ids.device):  # graph replays repeat what the eager warm-up steps checked
            torch._assert_async((self.pending_ids == input_ids).all(),
                                "teacher_ahead: the teacher ran ahead on other rows than this micro-batch's")
        if self.current is None:
            self.current = torch.empty_like(self.pending)
        return self.current.copy_(self.pending)

    def start(self, following_ids: torch.Tensor) -> None:
        device = following_ids.device
        if device.type == "cuda":
            if self.stream is None:
                self.stream = torch.cuda.Stream(device, priority=0)
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the ids, and take's read of pending
            with torch.cuda.stream(self.stream):
                self._write(following_ids)
            self.unjoined = True
        else:
            self._write(following_ids)

    def join(self) -> None:
        if self.unjoined:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.unjoined = False

    def _write(self, following_ids: torch.Tensor) -> None:
        """Into fixed buffers: a replayed graph reads pending where the captured step wrote it."""
        hidden = self.compute(following_ids)
        if self.pending is None:
            self.pending, self.pending_ids = torch.empty_like(hidden), torch.empty_like(following_ids)
        self.pending.copy_(hidden)
        self.pending_ids.copy_(following_ids)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
