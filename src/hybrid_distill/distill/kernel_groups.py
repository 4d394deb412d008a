"""Where a profiled step's device time goes, by kind of kernel (bench `--profile-top`, bench_inference.py's
`--profile-top`): the GEMM ceiling times the step's weight matmuls alone, and this says which kernels take the rest.

Kernels are grouped by name, first matching rule wins. The rules know CUDA kernel names (cuBLAS/CUTLASS GEMMs,
flash attention, Inductor's `triton_*` kernels, eager ATen kernels) and, for CPU profiles, ATen op names.
"""
from __future__ import annotations

import re

import torch

GROUP_RULES = (  # (group, pattern over the kernel's name), in order
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|splitk|^aten::(mm|addmm|bmm|baddbmm|linear|matmul)$"),
    ("attention", r"flash|fmha|sdpa|scaled_dot_product"),
    ("compiled (Inductor)", r"^triton_|compiledfunction|torch-compiled"),
    ("optimizer", r"adam|multi_tensor_apply|_foreach_"),
    ("casts and copies", r"memcpy|memset|copy|aten::to$|aten::_to_copy"),
    ("eager ATen", r"at::native|at::cuda|^void |^aten::"),
)
OTHER = "fla and other kernels"  # fla's Triton kernels carry their own function names
GROUPS = tuple(group for group, _ in GROUP_RULES) + (OTHER,)
_COMPILED_RULES = tuple((group, re.compile(pattern, re.IGNORECASE)) for group, pattern in GROUP_RULES)


def kernel_group(name: str) -> str:
    """The group a kernel (or, on CPU, an op) named `name` belongs to."""
    for group, pattern in _COMPILED_RULES:
        if pattern.search(name):
            return group
    return OTHER


def group_times(kernel_ms: dict[str, float]) -> list[dict]:
    """{kernel name: ms} -> one entry per group that took time, largest first: group, ms, share of the total,
    kernels (how many distinct names)."""
    totals: dict[str, list] = {}
    for name, ms in kernel_ms.items():
        entry = totals.setdefault(kernel_group(name), [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    whole = sum(ms for ms, _ in totals.values()) or 1.0
    return sorted(({"group": group, "ms": ms, "share": ms / whole, "kernels": count}
                   for group, (ms, count) in totals.items()), key=lambda entry: -entry["ms"])


def kernel_times(step, device: torch.device) -> dict[str, tuple[float, int]]:
    """{kernel name: (ms, calls)} of one call of `step` under the profiler: on CUDA the kernels' own device time
    (CPU-side ops report their kernels' time too, so they are left out), on CPU each op's own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    timed = [event for event in profiler.key_averages() if getattr(event, attribute, 0) > 0]
    if device.type == "cuda":
        timed = [event for event in timed if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return {event.key: (getattr(event, attribute) / 1e3, event.count) for event in timed}
