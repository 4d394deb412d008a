"""Times one short-conv call (forward, and forward + backward) with fla's kernel and ours (HD_SHORT_CONV=triton,
models/mixers/short_conv_triton.py; its row kernels and its tiled ones, HD_CONV_KERNELS) at the all-GDN bench's
shape (SmolLM2-135M, 64 x 512 tokens): one projection's 576 channels read in place from the mixer's input-GEMM
output, whose rows are 1760 elements long.
Median of 20 after 5, bf16, one H200 or H100; the graphed columns are device time per call (20 calls replayed as
one CUDA graph). Prints a table, the tiles our autotuned kernels chose and each candidate's timing; the
whole-step numbers come from `hybrid-distill bench --profile-top`."""
from __future__ import annotations

import os
import statistics

import torch

from hybrid_distill.models.mixers import short_conv_triton
from hybrid_distill.models.mixers.short_conv_triton import conv_silu


def fla_conv(x, weight, bias):
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d(x=x, weight=weight, bias=bias, activation="silu")[0]


def time_ms(function, repeats=20, warmup=5) -> float:
    times = []
    for index in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed_ms(function, calls=20) -> float:
    """Device time of one call: `calls` calls recorded in one CUDA graph (as a graphed step issues them), replayed."""
    for _ in range(3):  # autotune and compile outside the recording
        function()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    return time_ms(graph.replay) / calls


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(576, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 512, 576, device="cuda", dtype=torch.bfloat16)
    print(f"{'kernel':11}  {'forward ms':>10}  {'forward+backward ms':>19}  {'graphed forward':>15}  "
          f"{'graphed forward+backward':>24}")
    # q | k | v | gates, padded to 16 elements (the mixers' PROJECTION_ROW_MULTIPLE)
    x = torch.randn(64, 512, 1760, device="cuda", dtype=torch.bfloat16)[..., :576].requires_grad_()
    for name, conv, kernels in (("ours rows", conv_silu, "rows"), ("ours tiles", conv_silu, "tiles"),
                                ("fla", fla_conv, "rows")):
        os.environ["HD_CONV_KERNELS"] = kernels  # read at each call (models/mixers/kernels.py)
        forward = lambda: conv(x, weight, None)  # noqa: E731
        both = lambda: torch.autograd.grad(conv(x, weight, None), [x, weight], dy)  # noqa: E731
        print(f"{name:11}  {time_ms(forward):10.3f}  {time_ms(both):19.3f}  {graphed_ms(forward):15.3f}  "
              f"{graphed_ms(both):24.3f}", flush=True)
    for name, kernel in short_conv_triton._TUNED.items():
        print(f"tiles chosen, {name}: {kernel.best_config}")
        for config, timing in sorted(getattr(kernel, "configs_timings", {}).items(), key=lambda item: item[1]):
            print(f"    {timing}  {config}")


if __name__ == "__main__":
    main()
