"""A whole training step (forward, backward, clipping, optimizer update) captured once as a CUDA graph and replayed.

A stage-2 step of a small model launches thousands of kernels (fla's Triton kernels, compiled graphs, GEMMs),
and a slow host issues them more slowly than the GPU runs them: on an H200 the all-GDN step at 64 x 512 tokens
took 238 ms eager (the host busy issuing it all the while) against 168 ms of kernels (docs/performance.md,
session 13). A replayed graph issues the whole step in one call.

What capture needs from the step: fixed shapes, no host synchronisation (no `.item()`, no branching on tensor
values), inputs that are tensors (not host-side row lists), an optimizer built with `capturable=True` whose
learning rate is a tensor (a float would be frozen into the graph), and autocast without its weight-cast cache.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    """Calls `step(inputs) -> outputs` (a step that computes gradients from none and updates the weights) eagerly
    for the first `warmup` calls, each on a side stream and followed by clearing the gradients, as the eager
    loop does; the next call captures the step as a CUDA graph, and it and every later call copy their inputs
    into the captured ones and replay. The returned outputs are the captured tensors, overwritten by the next call.

    The warm-up calls are real steps: the compiler and the kernels' autotuning must run before the capture. The
    gradients the capture allocates stay the model's: nothing may set them to None between replays, and each
    replay's first backward writes them afresh (they were None when captured), so no zeroing is needed."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, warmup: int = 2):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("a graphed step needs an optimizer built with capturable=True")
        if warmup < 1:
            raise ValueError(f"a graphed step needs at least one warm-up step before its capture, got {warmup}")
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, inputs: torch.Tensor):
        if inputs.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors; the step's input is on {inputs.device}")
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # as torch.cuda.graph requires: warm-up off the capturing stream
                outputs = self.step(inputs)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            self._capture(inputs)
        self.inputs.copy_(inputs, non_blocking=True)
        self.graph.replay()
        return self.outputs

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _capture(self, example: torch.Tensor) -> None:
        """Records the step without running it (the caller then replays it on this call's inputs)."""
        self.inputs = example.clone()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(self.inputs)


def set_graph_options(optimizer, base_lr: float, device: torch.device | None) -> None:
    """Each group's learning rate as a tensor on `device` (a graphed step reads it there) and capturable, or with
    no device a float and not capturable; whatever a loaded state held. A state saved by a job of the other kind
    holds the other options, and a graph captured with a float rate would keep it for the rest of the job."""
    for group in optimizer.param_groups:
        rate = float(group["lr"])
        group["lr"] = rate if device is None else torch.tensor(rate, device=device)
        group["initial_lr"] = base_lr
        group["capturable"] = device is not None
