"""Time one held-out score (objectives.heldout_kl) with the teacher run live against the teacher's rows kept from a
job's first score (HeldoutTeacher), at SmolLM2-135M shapes with random weights: an all-GDN student with one softmax
layer, 32 held-out sequences of 512 tokens in batches of 8, as a scoring job scores (float32, no autocast).
Prints a table: median of 5 scores after 2 warm-up scores, and the two scores' values (they must be equal).

usage: python scripts/gpu/bench_heldout_score.py [--sequences 32] [--seq-len 512]
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.bench import SMOLLM2_135M
from hybrid_distill.distill.objectives import HeldoutTeacher, heldout_kl
from hybrid_distill.models.student import build_student

BATCH, CHUNK_TOKENS = 8, 2048  # the scoring jobs' EVAL_BATCH and configs/smollm2-*.yaml's kl_chunk_tokens


class Rows:
    def __init__(self, sequences: int, seq_len: int, device):
        self.tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (sequences, seq_len), device=device)
        self.num_sequences = sequences

    def batch(self, first, size):
        return self.tokens[first:first + size]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(score) -> tuple[float, float]:
    values, seconds = [], []
    for index in range(7):
        sync()
        start = time.perf_counter()
        values.append(score())
        sync()
        if index >= 2:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), values[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision-rows", action="store_true", help="also time TF32 matmuls and bf16 autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device).eval().requires_grad_(False)
    student = build_student(teacher, [0], "gdn").to(device)
    rows = Rows(args.sequences, args.seq_len, device)
    kept = HeldoutTeacher()
    live_s, live_kl = timed(lambda: heldout_kl(student, teacher, rows, args.sequences, BATCH, 1.0, CHUNK_TOKENS))
    kept_s, kept_kl = timed(lambda: heldout_kl(student, teacher, rows, args.sequences, BATCH, 1.0, CHUNK_TOKENS,
                                               kept))
    print(f"| teacher | seconds per score | held-out KL |\n| --- | ---: | ---: |\n"
          f"| live | {live_s:.4f} | {live_kl!r} |\n| kept ({kept.teacher_passes} passes) | {kept_s:.4f} | "
          f"{kept_kl!r} |\nspeed-up {live_s / kept_s:.2f}x, equal: {live_kl == kept_kl}")
    if args.precision_rows:  # what the score's float32 costs (not what jobs run)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32_s, tf32_kl = timed(lambda: heldout_kl(student, teacher, rows, args.sequences, BATCH, 1.0, CHUNK_TOKENS))
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16_s, bf16_kl = timed(lambda: heldout_kl(student, teacher, rows, args.sequences, BATCH, 1.0,
                                                       CHUNK_TOKENS))
        print(f"| live, TF32 matmuls | {tf32_s:.4f} | {tf32_kl!r} |\n| live, bf16 autocast | {bf16_s:.4f} | "
              f"{bf16_kl!r} |")


if __name__ == "__main__":
    main()
