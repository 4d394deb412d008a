"""Bench results side by side: tokens/s against the first file's, and, where both were profiled, the kinds of
kernel and the kernels whose time moved (src/hybrid_distill/distill/bench_compare.py).

    python scripts/compare_benches.py docs/results/conv_grads_in_place_h200/0_graph_gdn_split.json \\
        docs/results/conv_grads_in_place_h200/1_graph_gdn_in_place.json

Compare only results from one machine: the same card model varies by a few percent from machine to machine.
"""
import argparse
import sys
from pathlib import Path

from hybrid_distill.distill.bench_compare import format_comparison, load_result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench JSON files (`hybrid-distill bench --out`), "
                                                               "the baseline first")
    parser.add_argument("--min-kernel-ms", type=float, default=0.2,
                        help="list the kernels whose time per step moved by at least this much")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = [load_result(path) for path in args.results]
    except ValueError as error:
        print(f"compare_benches: error: {error}", file=sys.stderr)
        return 2
    print(format_comparison(results, [path.stem for path in args.results], args.min_kernel_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
