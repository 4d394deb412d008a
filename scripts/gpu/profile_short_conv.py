"""One forward + backward of our short conv (short_conv_triton.py) at the all-GDN bench's shape (576 channels read
in place from a 1,760-element GEMM row, 64 x 512 tokens, bf16), inside cudaProfilerStart/Stop after autotuning, so
that Nsight Compute profiles only those kernels:

    ncu --profile-from-start off --set full -o OUT/short_conv python scripts/gpu/profile_short_conv.py

It profiles the kernels HD_CONV_KERNELS picks (rows by default, tiles for the two-pass backward).
Why: the tiled backward's first pass took 82-103 us per call against about 28 us of bytes (session 20); the row
kernels still run at about half the memory bandwidth (session 23, docs/performance.md); the profiler's memory and
stall charts say where the time goes."""
from __future__ import annotations

import torch

from hybrid_distill.models.mixers.short_conv_triton import conv_silu


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(576, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 512, 576, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 512, 1760, device="cuda", dtype=torch.bfloat16)[..., :576].requires_grad_()
    step = lambda: torch.autograd.grad(conv_silu(x, weight, None), [x, weight], dy)  # noqa: E731
    for _ in range(5):  # autotune and compile outside the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled one forward + backward")


if __name__ == "__main__":
    main()
