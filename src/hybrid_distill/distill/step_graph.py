"""A whole training step (forward, backward, clipping, optimizer update) captured once as a CUDA graph and replayed.

A stage-2 step of a small model launches thousands of kernels (fla's Triton kernels, compiled graphs, GEMMs),
and a slow host issues them more slowly than the GPU runs them: on an H200 the all-GDN step at 64 x 512 tokens
took 238 ms eager (the host busy issuing it all the while) against 168 ms of kernels (docs/performance.md,
session 13). A replayed graph issues the whole step in one call.

What capture needs from the step: fixed shapes, no host synchronisation (no `.item()`, no branching on tensor
values), inputs that are tensors (host-side data, such as a teacher cache's rows, is read before the step and
passed in as a tensor), an optimizer built with `capturable=True` whose
learning rate is a tensor (a float would be frozen into the graph), and autocast without its weight-cast cache.
The recorded steps run inside `kernels.graphed_steps()`, where the mixers pick the kernels that pay once launches
are free (fla's short conv).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from hybrid_distill.models.mixers import kernels


class GraphedStep:
    """Calls `step(inputs) -> outputs` (a step that computes gradients from none and updates the weights) eagerly
    for the first `warmup` calls of each form of its inputs (a tensor, or tuples, lists and dicts of them: their
    nesting, keys, shapes and dtypes), each on a side stream between two clearings of the gradients, as the eager
    loop does; the next call of that form captures the step as a CUDA graph, and it and every later call of the
    form copy their inputs into the captured ones and replay. The returned outputs are the captured tensors,
    overwritten by the next call of the form.

    Each form is a variant of the step with its own code: micro-batches that bring the teacher's cached outputs
    (a dict with them) against micro-batches that run the teacher (an empty dict). Each variant has its own graph
    and memory pool, so two variants hold two steps' activations.

    The warm-up calls are real steps: the compiler and the kernels' autotuning must run before the capture. The
    gradients a capture allocates stay in its graph: each replay's first backward writes them afresh (they were
    None when captured), so no zeroing is needed, and the graph's clipping and optimizer read them there.
    `stream_priority` is the CUDA priority of the stream the step runs and is captured on (lower is more urgent):
    below 0 it goes ahead of work the step queues on default-priority side streams (a teacher running ahead)."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, warmup: int = 2, stream_priority: int = 0):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("a graphed step needs an optimizer built with capturable=True")
        if warmup < 1:
            raise ValueError(f"a graphed step needs at least one warm-up step before its capture, got {warmup}")
        self.step, self.optimizer, self.warmup, self.stream_priority = step, optimizer, warmup, stream_priority
        self.calls: dict[Hashable, int] = {}  # by form of the inputs
        self.captures: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any, Any]] = {}  # form -> graph, inputs, outputs

    def __call__(self, inputs):
        _map(_check_on_gpu, inputs)
        key = _form(inputs)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.warmup:
            side = torch.cuda.Stream(priority=self.stream_priority)
            side.wait_stream(torch.cuda.current_stream())
            # as torch.cuda.graph requires: warm-up off the capturing stream
            with torch.cuda.stream(side), kernels.graphed_steps():
                self.optimizer.zero_grad(set_to_none=True)  # after another form's capture they hold its gradients
                outputs = self.step(inputs)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if key not in self.captures:
            self.captures[key] = self._capture(inputs)
        graph, static_inputs, outputs = self.captures[key]
        _map(lambda static, new: static.copy_(new, non_blocking=True), static_inputs, inputs)
        graph.replay()
        return outputs

    @property
    def captured(self) -> bool:
        return bool(self.captures)

    def _capture(self, example) -> tuple[torch.cuda.CUDAGraph, Any, Any]:
        """Records the step without running it (the caller then replays it on this call's inputs)."""
        static_inputs = _map(torch.Tensor.clone, example)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(priority=self.stream_priority)  # torch.cuda.graph's own has the default priority
        with torch.cuda.graph(graph, stream=stream), kernels.graphed_steps():
            outputs = self.step(static_inputs)
        return graph, static_inputs, outputs


def _check_on_gpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda":
        raise ValueError(f"a CUDA graph needs CUDA tensors; the step's input is on {tensor.device}")


def _form(tree) -> Hashable:
    """What must match for a captured graph to take `tree`: its nesting, dict keys, tensor shapes and dtypes."""
    if isinstance(tree, torch.Tensor):
        return tuple(tree.shape), tree.dtype
    if isinstance(tree, dict):
        return tuple((key, _form(value)) for key, value in sorted(tree.items()))
    if isinstance(tree, (tuple, list)):
        return tuple(_form(item) for item in tree)
    raise TypeError(f"a graphed step's inputs are tensors, tuples, lists or dicts, not {type(tree).__name__}")


def _map(function: Callable, *trees):
    """`function` applied to the tensors of trees of one form (`_form`), in that form."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return function(*trees)
    if isinstance(first, dict):
        return {key: _map(function, *(tree[key] for tree in trees)) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_map(function, *items) for items in zip(*trees))
    raise TypeError(f"a graphed step's inputs are tensors, tuples, lists or dicts, not {type(first).__name__}")


def set_graph_options(optimizer, base_lr: float, device: torch.device | None) -> None:
    """Each group's learning rate as a tensor on `device` (a graphed step reads it there) and capturable, or with
    no device a float and not capturable; whatever a loaded state held. A state saved by a job of the other kind
    holds the other options, and a graph captured with a float rate would keep it for the rest of the job."""
    for group in optimizer.param_groups:
        rate = float(group["lr"])
        group["lr"] = rate if device is None else torch.tensor(rate, device=device)
        group["initial_lr"] = base_lr
        group["capturable"] = device is not None
