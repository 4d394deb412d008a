"""The live teacher's forward on a second CUDA stream, beside the student's forward (`distill.teacher_stream`).

Why: in a stage-2 step the teacher's body (2N of the step's 8N FLOPs) needs nothing from the student until the KL,
yet on one stream it runs before the student's forward, kernel after kernel. On a second stream the GPU may run
the two forwards' kernels side by side: the student's memory-bound chains (fla's kernels, norms, the short convs)
beside the teacher's GEMMs. A CUDA graph records the fork and the join, so a replayed step keeps the overlap
(PyTorch serves a captured side stream's allocations from the graph's memory pool). On CPU, or with the option
off, the teacher runs in line: the same values either way.
"""
from __future__ import annotations

from typing import Callable

import torch


class TeacherStream:
    """`start(fn)` runs fn() on this stream after the work queued so far on the current one; `join(tensor)` makes
    the current stream wait for it before `tensor` (fn's result) is used there. Without CUDA both run in line."""

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # one per device, made on first use

    def start(self, fn: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return fn()
        stream = self.streams.setdefault(device, torch.cuda.Stream(device))
        stream.wait_stream(torch.cuda.current_stream(device))  # the step's inputs are written on the current one
        with torch.cuda.stream(stream):
            return fn()

    def join(self, tensor: torch.Tensor) -> torch.Tensor:
        """No record_stream: the side stream reuses the tensor's memory only for work queued after a later start(),
        which waits for everything queued on the current stream, the tensor's last uses included."""
        if tensor.device.type != "cuda":
            return tensor
        torch.cuda.current_stream(tensor.device).wait_stream(self.streams[tensor.device])
        return tensor
