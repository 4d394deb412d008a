"""Benchmark distillation steps (naive vs project) and print a table; same as `hybrid-distill bench`."""
import sys

from hybrid_distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
