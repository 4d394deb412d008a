"""Where one decode step's time goes: its kernels, their count and device time, against the step's wall time.

Why: at SmolLM2 shapes a graphed decode step is a few hundred small kernels, and the hybrid's lead over the teacher
depends on what both spend outside attention (session 24 estimated a bound from one old profile). The gap between
the kernels' device time and the wall time is what the kernel count costs beyond the kernels themselves. On CPU
the same step runs eagerly and its ATen ops are listed instead.
"""
from __future__ import annotations

import time

import torch

from hybrid_distill.distill.kernel_groups import group_times, kernel_times
from hybrid_distill.evaluate.efficiency import synchronize
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder

WARMUP_STEPS = 2


@torch.no_grad()
def profile_decode_step(model, prompt: torch.Tensor, top: int = 20, steps: int = 4) -> dict:
    """Decode `steps` tokens after the prompt (graph replays on CUDA) under the profiler; per step: wall ms, device
    ms in kernels (CPU: ATen op time), kernel launches, and the `top` kernels by time with their groups."""
    if steps < 1 or top < 0:
        raise ValueError(f"need steps >= 1 and top >= 0, got {steps} and {top}")
    device = prompt.device
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, WARMUP_STEPS + 2 * steps)
    for _ in range(WARMUP_STEPS):
        decoder.step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    times = kernel_times(lambda: [decoder.step() for _ in range(steps)], device)
    if device.type != "cuda":  # ATen ops only: the profiler's Python-level events would count as launches
        times = {name: value for name, value in times.items() if name.startswith("aten::")}
    per_step = {name: ms / steps for name, (ms, _) in times.items()}
    calls = {name: count / steps for name, (_, count) in times.items()}
    ranked = sorted(per_step, key=per_step.get, reverse=True)[:top]
    return {"wall_ms": wall_ms, "device_ms": sum(per_step.values()), "launches": sum(calls.values()),
            "top": [{"name": name[:90], "ms": per_step[name], "calls": calls[name]} for name in ranked],
            "groups": group_times(per_step)}
