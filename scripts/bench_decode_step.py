"""Times decode_step_triton's kernel alone (one GDN layer's decode step) at SmolLM2-135M and Llama-3.2-3B head shapes,
for several warps per program, and prints a table: microseconds per call and the state's bytes moved per second.

Usage (GPU): python scripts/bench_decode_step.py [--batch 16] [--warps 2 4 8 16] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"smollm2": (9, 64), "llama3b": (24, 128)}   # GDN heads (GQA expanded) and head size


def time_call(call, repeats: int = 200) -> float:
    """Median-free mean microseconds per call over `repeats` calls captured in one CUDA graph (as decoding runs)."""
    for _ in range(3):
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def main(argv=None) -> int:
    from hybrid_distill.evaluate.run_eval import write_json_atomic
    from hybrid_distill.models.mixers.decode_step_triton import gdn_decode_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("times a GPU kernel: run it on a CUDA device")
    rows = []
    print(f"{'shapes':8} {'heads':>5} {'dim':>4} {'warps':>5} {'us/call':>8} {'state GB/s':>10}")
    for name, (heads, dim) in SHAPES.items():
        batch, inner = args.batch, heads * dim
        with torch.device("cuda"):
            q, k, v = (torch.randn(batch, 1, inner, dtype=torch.bfloat16) for _ in range(3))
            a, b = (torch.randn(batch, 1, heads, dtype=torch.bfloat16) for _ in range(2))
            caches = [torch.randn(batch, inner, 3, dtype=torch.bfloat16) for _ in range(3)]
            weights = [torch.randn(inner, 1, 4, dtype=torch.bfloat16) for _ in range(3)]
            A_log, dt_bias = torch.zeros(heads), torch.zeros(heads)
            state = torch.randn(batch, heads, dim, dim) * 0.01
            norm = torch.ones(dim, dtype=torch.bfloat16)
        for warps in args.warps:
            micros = time_call(lambda: gdn_decode_step(q, k, v, a, b, caches, weights, A_log, dt_bias, state, None,
                                                       norm, 1e-6, dim ** -0.5, num_warps=warps))
            rate = 2 * state.numel() * 4 / (micros * 1e-6) / 1e9
            rows.append({"shapes": name, "heads": heads, "dim": dim, "warps": warps, "us": micros,
                         "state_gb_s": rate})
            print(f"{name:8} {heads:5} {dim:4} {warps:5} {micros:8.2f} {rate:10.0f}", flush=True)
    if args.out:
        write_json_atomic(args.out, {"device": torch.cuda.get_device_name(), "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
