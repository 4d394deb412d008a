"""Decode speed and cache bytes of the teacher vs a hybrid at SmolLM2-135M shapes (random weights): a table + JSON.

    python scripts/bench_inference.py --contexts 2048 8192 --batches 1 16 --softmax-ratio 0.25 --out bench.json

On a GPU each model is timed twice: decoding as CUDA-graph replays on a fixed-address cache (what the workflow's
efficiency step reports) and as HF's eager loop (`--decode graph` or `--decode eager` keeps one).
"""
import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    """The bench's arguments (also read by scripts/gpu/rehearse.py, which checks a lease's commands on a CPU)."""
    from hybrid_distill.cli_more import _shape_item

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--softmax-ratio", type=float, default=0.25)
    parser.add_argument("--mixer", default="gdn", choices=["gdn", "gla"])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode", default="both", choices=["both", "graph", "eager"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the same blocks of both models: MLPs, norms, softmax attention, and the "
                             "hybrid's mixer maths (on a GPU with --decode graph)")
    parser.add_argument("--shape", nargs="+", type=_shape_item, default=[], metavar="KEY=INT",
                        help="config changes from SmolLM2-135M's shape, e.g. for Llama-3.2-3B: hidden_size=3072 "
                             "intermediate_size=8192 num_hidden_layers=28 num_attention_heads=24 "
                             "num_key_value_heads=8 head_dim=128 vocab_size=128256")
    parser.add_argument("--profile-top", type=int, default=0, metavar="N",
                        help="also profile a few decode steps of each model at the last context and batch: wall and "
                             "kernel ms per step, kernel launches, the N kernels that took longest")
    parser.add_argument("--out", default=None)
    return parser


def main(argv=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_distill.distill.bench import SMOLLM2_135M
    from hybrid_distill.distill.compiled_blocks import compile_student
    from hybrid_distill.evaluate.efficiency import measure_inference
    from hybrid_distill.evaluate.run_eval import write_json_atomic
    from hybrid_distill.evaluate.packed_projections import packed_decode_choice
    from hybrid_distill.models.mixers.kernels import op_choice
    from hybrid_distill.models.student import build_student
    from hybrid_distill.select.layer_sets import k_from_ratio, uniform_layers

    parser = build_parser()
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile and device == "cuda" and args.decode != "graph":
        parser.error("--compile times graphed decoding only (--decode graph): HF's eager loop grows its cache every "
                     "token, and each compiled attention layer would recompile at every token")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    modes = {"both": [True, False], "graph": [True], "eager": [False]}[args.decode] if device == "cuda" else [False]
    torch.manual_seed(0)
    with torch.device(device):   # large shapes initialise on the GPU
        teacher = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, **dict(args.shape)})).to(dtype).eval()
    layers = teacher.config.num_hidden_layers
    k = k_from_ratio(layers, args.softmax_ratio)
    hybrid = build_student(teacher, uniform_layers(layers, k), args.mixer).to(device, dtype).eval()
    if args.compile:
        # one graph per layer (HF's layer index is a constant) and per prefill and decode shape; past the limit
        # Dynamo would run the rest eagerly and time something else than the bench says, so on a GPU it must fail
        # instead (a CPU runs HF's eager loop, whose growing cache recompiles at every token: no timing there)
        torch._dynamo.config.recompile_limit = max(64, 4 * teacher.config.num_hidden_layers)
        torch._dynamo.config.fail_on_recompile_limit_hit = device == "cuda"
        for model in (teacher, hybrid):  # the same blocks of both (before session 29 the teacher's attention ran eager)
            compile_student(model)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "packed_decode": packed_decode_choice(), "gdn_decode": op_choice("HD_GDN_DECODE"),
              "gla_decode": op_choice("HD_GLA_DECODE"),
              "mixer": args.mixer, "k": k, "layers": layers, "compile": args.compile, "shape": dict(args.shape), "rows": {}}
    print(f"{result['device']} {dtype}: teacher vs {args.mixer} hybrid with {k}/{layers} softmax layers"
          f"{', compiled' if args.compile else ''}, packed decode projections {result['packed_decode']}, "
          f"decode step {result[args.mixer + '_decode']}")
    print(f"{'model':14} {'decode':>10} {'context':>8} {'batch':>6} {'prefill ms':>11} {'decode tok/s':>13} "
          f"{'cache MiB':>10} {'peak MiB':>9}", flush=True)
    for name, model in (("teacher", teacher), (f"hybrid_K{k}", hybrid)):
        rows = result["rows"][name] = [row for graphed in modes for row in measure_inference(
            model, args.contexts, args.batches, args.decode_tokens, warmup=1, repeats=3, device=device,
            cuda_graphs=graphed)]
        for row in rows:  # each model's rows as they come: a bench killed at its time limit keeps the teacher's
            print(_table_line(name, row), flush=True)
    if args.profile_top:
        result["profiles"] = _profiles(teacher, hybrid, k, args, device)
    if args.out:  # whole or not at all: a bench killed at its time limit leaves no JSON that looks finished
        write_json_atomic(args.out, result)


def _table_line(name: str, row: dict) -> str:
    """One row of the printed table (OOM where a setting ran out of memory)."""
    prefill = f"{row['prefill_s'] * 1e3:11.1f}" if row["prefill_s"] else f"{'OOM':>11}"
    decode = f"{row['decode_tok_s']:13.1f}" if row["decode_tok_s"] else f"{'OOM':>13}"
    cache = f"{row['cache_bytes'] / 2**20:10.1f}" if row["cache_bytes"] else f"{'-':>10}"
    peak = f"{row['peak_mem_bytes'] / 2**20:9.0f}" if row["peak_mem_bytes"] else f"{'-':>9}"
    return f"{name:14} {row['decode']:>10} {row['context']:8d} {row['batch']:6d} {prefill} {decode} {cache} {peak}"


def _profiles(teacher, hybrid, k, args, device) -> dict:
    """profile_decode_step of both models at the last context and batch, printed as they come."""
    from hybrid_distill.evaluate.decode_profile import profile_decode_step

    context, batch = args.contexts[-1], args.batches[-1]
    prompt = torch.randint(teacher.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    profiles = {}
    for name, model in (("teacher", teacher), (f"hybrid_K{k}", hybrid)):
        found = profiles[name] = profile_decode_step(model, prompt.to(device), top=args.profile_top)
        units = "kernels" if device == "cuda" else "ATen ops"
        print(f"-- {name}, one decode step at {context} x {batch}: {found['wall_ms']:.3f} ms wall, "
              f"{found['device_ms']:.3f} ms in {found['launches']:.0f} {units}")
        for kernel in found["top"]:
            print(f"   {kernel['ms'] * 1e3:8.1f} us  x{kernel['calls']:<5.0f} {kernel['name']}")
        for group in found["groups"]:
            print(f"   {group['ms'] * 1e3:8.1f} us  {group['share']:6.1%}  {group['group']}")
    return profiles


if __name__ == "__main__":
    sys.exit(main())
