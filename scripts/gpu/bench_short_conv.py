"""Times one short-conv call over a GDN mixer's q, k and v block (forward, and forward + backward) with fla's kernel
and ours, at the all-GDN bench's shape (SmolLM2-135M, 64 x 512 tokens): median of 20 after 5, bf16, one H200 or H100.
Prints a table; the whole-step numbers come from `hybrid-distill bench --profile-top`."""
from __future__ import annotations

import statistics

import torch

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


def main() -> None:
    torch.manual_seed(0)
    block = torch.randn(64, 512, 1752, device="cuda", dtype=torch.bfloat16)[..., :1728]  # the GEMM output's q|k|v
    weight = torch.randn(1728, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = block.detach().requires_grad_()
    dy = torch.randn(64, 512, 1728, device="cuda", dtype=torch.bfloat16)
    print("kernel  forward ms  forward+backward ms")
    for name, conv in (("fla", fla_conv), ("ours", conv_silu)):
        forward = time_ms(lambda: conv(x, weight, None))
        both = time_ms(lambda: torch.autograd.grad(conv(x, weight, None), [x, weight], dy))
        print(f"{name:6}  {forward:10.3f}  {both:19.3f}")


if __name__ == "__main__":
    main()
