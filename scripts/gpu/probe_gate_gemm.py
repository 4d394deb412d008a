"""Times GDN's a/b gate projections (forward and backward) as two [tokens x heads] GEMMs against the mixer's own
`_gate_logits` (one GEMM with its output rows padded to a multiple of 8), at a stage-2 step's token count: with
9 heads (SmolLM2) the unpadded rows are unaligned for cuBLAS. Needs the project's source and its dependencies (on
the lent GPU: after `source scripts/gpu/unpack.sh`) and a CUDA device; prints a table.
Usage: python scripts/gpu/probe_gate_gemm.py [--heads 9] [--hidden 576] [--tokens 32768]"""
import argparse

import torch

from hybrid_distill.models.mixers.gdn import GatedDeltaNetMixer
from hybrid_distill.models.mixers.spec import MixerSpec


def time_ms(project, x, repeats=50):
    def step():
        a_logits, b_logits = project(x)
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
    spec = MixerSpec(kind="gdn", hidden_size=args.hidden, num_heads=args.heads, head_dim=64)
    mixer = GatedDeltaNetMixer(spec, layer_idx=0).to("cuda", torch.bfloat16)
    with torch.no_grad():  # the fresh init zeroes these weights
        mixer.a_proj.weight.normal_()
        mixer.b_proj.weight.normal_()
    x = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def two_gemms(hidden):
        return mixer.a_proj(hidden), mixer.b_proj(hidden)

    for reference, padded in zip(two_gemms(x), mixer._gate_logits(x)):  # a different kernel may round differently
        torch.testing.assert_close(padded, reference, rtol=1.6e-2, atol=1e-2)
    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens, hidden {args.hidden}, {args.heads} heads, bf16")
    print("projection              fwd+bwd ms per layer")
    for name, project in (("two GEMMs", two_gemms), ("one padded GEMM", mixer._gate_logits)):
        print(f"{name:<22} {time_ms(project, x):10.3f}")


if __name__ == "__main__":
    main()
