"""Where one decode step's time goes: its kernels, their count and device time, against the step's wall time.

Why: at SmolLM2 shapes a graphed decode step is a few hundred small kernels, and the hybrid's lead over the teacher
depends on what both spend outside attention (session 24 estimated a bound from one old profile). The gap between
the kernels' device time and the wall time is what the kernel count costs beyond the kernels themselves. On CPU the same step runs eagerly and its ATen ops are listed instead.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from hybrid_distill.distill.kernel_groups import group_times
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder

WARMUP_STEPS = 2


@torch.no_grad()
def profile_decode_step(model, prompt: torch.Tensor, top: int = 20, steps: int = 4) -> dict:
    """Decode `steps` tokens after the prompt (graph replays on CUDA) under the profiler; per step: wall ms, device
    ms in kernels (CPU: op time), kernel launches, and the `top` kernels by time with their groups."""
    if steps < 1 or top < 0:
        raise ValueError(f"need steps >= 1 and top >= 0, got {steps} and {top}")
    device = prompt.device
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, WARMUP_STEPS + 2 * steps)
    for _ in range(WARMUP_STEPS):
        decoder.step()
    wall_ms = _wall_ms_per_step(decoder, steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            decoder.step()
        _synchronize(device)
    kernels = _kernel_events(profiler.key_averages(), device)
    attribute = _time_attribute(device)
    per_step = {event.key: getattr(event, attribute) / 1e3 / steps for event in kernels}
    calls = {event.key: event.count / steps for event in kernels}
    ranked = sorted(per_step, key=per_step.get, reverse=True)[:top]
    return {"wall_ms": wall_ms, "device_ms": sum(per_step.values()), "launches": sum(calls.values()),
            "top": [{"name": name[:90], "ms": per_step[name], "calls": calls[name]} for name in ranked],
            "groups": group_times(per_step)}


def _wall_ms_per_step(decoder: StaticGreedyDecoder, steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3 / steps


def _kernel_events(events, device: torch.device) -> list:
    """GPU kernels on CUDA (CPU-side ops report their kernels' time too, so they are left out); ATen ops on CPU."""
    attribute = _time_attribute(device)
    timed = [event for event in events if getattr(event, attribute, 0) > 0]
    if device.type == "cuda":
        return [event for event in timed if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return [event for event in timed if event.key.startswith("aten::")]


def _time_attribute(device: torch.device) -> str:
    return "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
