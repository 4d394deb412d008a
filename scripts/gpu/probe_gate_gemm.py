"""Times GDN's a/b gate projections (forward and backward) as two [tokens x heads] GEMMs against one GEMM with its
output rows padded to a multiple of 8, at a stage-2 step's token count: with 9 heads (SmolLM2) the unpadded rows
are unaligned for cuBLAS. Needs only torch and a CUDA device; prints a table.
Usage: python scripts/gpu/probe_gate_gemm.py [--heads 9] [--hidden 576] [--tokens 32768]"""
import argparse

import torch
import torch.nn.functional as F


def two_gemms(x, a, b):
    return F.linear(x, a), F.linear(x, b)


def one_padded_gemm(x, a, b):
    heads = a.shape[0]
    weight = torch.cat([a, b])
    logits = F.linear(x, F.pad(weight, (0, 0, 0, -(2 * heads) % 8)))
    return logits[..., :heads], logits[..., heads:2 * heads]


def time_ms(project, x, a, b, repeats=50):
    def step():
        a_logits, b_logits = project(x, a, b)
        (a_logits.float().sum() + b_logits.float().sum()).backward()
    for _ in range(5):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a, b = (torch.randn(args.heads, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    reference = two_gemms(x, a, b)
    padded = one_padded_gemm(x, a, b)
    for r, p in zip(reference, padded):  # the same dot products; a different kernel may round differently
        torch.testing.assert_close(p, r, rtol=1.6e-2, atol=1e-2)
    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens, hidden {args.hidden}, {args.heads} heads, bf16")
    print("projection              fwd+bwd ms per layer")
    for name, project in (("two GEMMs", two_gemms), ("one padded GEMM", one_padded_gemm)):
        print(f"{name:<22} {time_ms(project, x, a, b):10.3f}")


if __name__ == "__main__":
    main()
