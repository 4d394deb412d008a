"""CLI steps for evaluation, reporting, benchmarks and Slurm submission (kept apart from the training steps)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _config(args):
    from hybrid_distill.config.load import load_config

    return load_config(args.config)


def step_make_recall_data(args):
    """Task files at the configured lengths with the teacher's tokenizer, plus the lm-eval task YAMLs."""
    from hybrid_distill.data.packed import PackedTokens
    from hybrid_distill.distill.atomic import publish_dir
    from hybrid_distill.evaluate.recall_lm_eval import build_task_dir
    from hybrid_distill.evaluate.recall_tasks import write_task_files
    from hybrid_distill.models.checkpoint import load_tokenizer

    config = _config(args)
    evaluation = config["evaluate"]
    tokenizer = load_tokenizer(args.teacher)
    haystack = None
    if evaluation["haystack"] == "heldout":
        heldout = PackedTokens(Path(args.data) / "heldout.bin")
        haystack = tokenizer.batch_decode(heldout.batch(0, heldout.num_sequences), skip_special_tokens=True)
    out = Path(args.out)
    staging = out.with_name(f".{out.name}.tmp")
    write_task_files(staging / "data", tokenizer, evaluation["recall_tasks"], evaluation["context_lengths"],
                     evaluation["num_examples"], config["seed"], haystack_texts=haystack)
    publish_dir(staging, out)
    build_task_dir(out / "data", out / "tasks", evaluation["recall_tasks"], evaluation["context_lengths"],
                   datasets_cache_dir=out / "hf_cache")


def recall_task_names(config) -> list[str]:
    from hybrid_distill.evaluate.recall_lm_eval import lm_eval_task_name

    evaluation = config["evaluate"]
    return [lm_eval_task_name(task, length) for task in evaluation["recall_tasks"]
            for length in evaluation["context_lengths"]]


def _meta(args) -> dict:
    from hybrid_distill.models.checkpoint import _read_config

    model_config = _read_config(Path(args.model))
    hybrid = getattr(model_config, "hybrid", None) or {}
    layers = model_config.num_hidden_layers
    return {"model": args.name, "kind": args.kind, "selector": args.selector, "k": args.k, "ratio": args.ratio,
            "mixer": args.mixer, "num_layers": layers,
            "softmax_layers": hybrid.get("softmax_layers", list(range(layers)))}


def step_evaluate(args):
    from hybrid_distill.evaluate.run_eval import evaluate_checkpoint

    config = _config(args)
    evaluation = config["evaluate"]
    tasks = recall_task_names(config) + list(evaluation["lm_eval_tasks"])
    evaluate_checkpoint(args.model, tasks, Path(args.recall) / "tasks", args.out,
                        batch_size=evaluation["batch_size"], dtype=evaluation["dtype"], extra=_meta(args),
                        heldout_dir=args.data, heldout_sequences=config["data"]["heldout_sequences"],
                        samples_per_task=evaluation["samples_per_task"])


def step_measure_efficiency(args):
    from hybrid_distill.evaluate.efficiency import write_efficiency

    config = _config(args)
    write_efficiency(args.model, args.out, context_lengths=config["evaluate"]["efficiency_contexts"],
                     batch_sizes=config["evaluate"]["efficiency_batches"],
                     decode_tokens=config["evaluate"]["efficiency_decode_tokens"],
                     repeats=config["evaluate"]["efficiency_repeats"], dtype=config["evaluate"]["dtype"],
                     extra=_meta(args), cuda_graphs=config["evaluate"]["efficiency_cuda_graphs"])


def step_make_report(args):
    from hybrid_distill.report.build import build_report

    build_report(args.evals, args.efficiency, args.importance, args.selections, args.early_stop, args.out,
                 args.title, report_path=args.report)


def bench_settings(args) -> dict:
    """`hybrid-distill bench`'s arguments as distill.bench.BenchSettings' fields (also read by
    scripts/gpu/rehearse.py, which checks a lease's bench commands without running them)."""
    return dict(batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup, repeats=args.repeats,
                stages=args.stages, students=args.students, shape=dict(args.shape),
                chunk_tokens=args.kl_chunk_tokens, stage2_steps=args.stage2_steps,
                activation_checkpointing=args.activation_checkpointing, compile_blocks=args.compile_blocks,
                bf16_weights=args.bf16_weights, compile_kl=args.compile_kl, profile_top=args.profile_top,
                gemm_ceiling=args.gemm_ceiling, cuda_graph=args.cuda_graph, micro_batches=args.micro_batches,
                activation_memory_budget=args.activation_memory_budget,
                activation_memory_budget_layers=args.activation_memory_budget_layers,
                teacher_stream=args.teacher_stream, teacher_ahead=args.teacher_ahead)


def step_bench(args):
    from hybrid_distill.distill.bench import format_table, run_benchmark, write_result

    result = run_benchmark(**bench_settings(args))
    if result["rank"] != 0:
        return  # under `accelerate launch --num_processes N`, the first process reports for all
    print(format_table(result))
    if args.out:
        write_result(result, args.out)


def _shape_item(text: str) -> tuple[str, int]:
    from hybrid_distill.distill.bench import SMOLLM2_135M

    integer_keys = sorted(key for key, value in SMOLLM2_135M.items() if type(value) is int)
    key, _, value = text.partition("=")
    if key not in integer_keys or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INTEGER with KEY one of {integer_keys}")
    return key, int(value)


def _model_args(parser):
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--name", required=True)
    parser.add_argument("--kind", required=True, choices=["teacher", "all_linear", "hybrid"])
    parser.add_argument("--mixer", default=None)
    parser.add_argument("--selector", default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--out", required=True, type=Path)


def add_steps(steps, add):
    p = add(steps, "make-recall-data", step_make_recall_data, "generate the offline recall suite and its lm-eval tasks")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = add(steps, "evaluate", step_evaluate, "run lm-eval (recall suite + configured tasks) and held-out perplexity")
    _model_args(p)
    p.add_argument("--recall", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)

    p = add(steps, "measure-efficiency", step_measure_efficiency, "prefill time, decode tokens/s and cache bytes")
    _model_args(p)

    p = add(steps, "bench", step_bench, "time naive vs project stage steps, live or cached teacher (table + JSON)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    p.add_argument("--students", nargs="+", default=["softmax", "gdn", "gla"], choices=["softmax", "gdn", "gla"])
    p.add_argument("--kl-chunk-tokens", type=int, default=4096, help="tokens per chunk of the fused KL (stage 2)")
    p.add_argument("--shape", nargs="+", type=_shape_item, default=[], metavar="KEY=INT",
                   help="model config changes from SmolLM2-135M's shape, e.g. num_hidden_layers=4 hidden_size=256")
    p.add_argument("--stage2-steps", nargs="+", default=["naive", "project", "cached"],
                   choices=["naive", "project", "cached"],
                   help="stage-2 steps timed: full logits, the project's (live teacher), the project's on a "
                        "teacher cache")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="the project's stage-2 step recomputes each decoder layer in backward")
    p.add_argument("--compile-blocks", action="store_true",
                   help="torch.compile the student's and teacher's decoder layers whole (fla's kernel calls left out), "
                        "as distill.compile_blocks (project steps only)")
    p.add_argument("--bf16-weights", action="store_true",
                   help="bf16 student weights with float32 master copies in AdamW, as distill.bf16_weights "
                        "(project steps only)")
    p.add_argument("--compile-kl", action="store_true",
                   help="compile the KL's per-chunk maths, as distill.compile_kl (project steps only)")
    p.add_argument("--teacher-stream", action=argparse.BooleanOptionalAction, default=True,
                   help="run the live teacher's forward on a second CUDA stream beside the student's, as "
                        "distill.teacher_stream, on by default as there (project steps only; --no-teacher-stream "
                        "runs it in line)")
    p.add_argument("--teacher-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="run the live teacher one micro-batch ahead, beside the student's forward and backward, as "
                        "distill.teacher_ahead, on by default as there (project steps only; the next batch is the "
                        "same batch here; --no-teacher-ahead runs it on each step's own batch, see --teacher-stream)")
    p.add_argument("--gemm-ceiling", action="store_true",
                   help="also time each stage-2 row's weight GEMMs alone at the step's shapes: the MFU the step "
                        "would reach if nothing else took time")
    p.add_argument("--profile-top", type=int, default=0, metavar="N",
                   help="also profile one step per row and list its N most expensive kernels")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each project or cached step (forward, backward, AdamW) once as a CUDA graph and "
                        "time its replays (CUDA, one process)")
    p.add_argument("--activation-memory-budget", type=float, default=1.0, metavar="F",
                   help="share of the compiled code's activations kept for backward; the cheapest of the rest are "
                        "recomputed, as distill.activation_memory_budget (project steps only)")
    p.add_argument("--activation-memory-budget-layers", type=int, default=None, metavar="N",
                   help="give --activation-memory-budget to the student's first N decoder layers only, as "
                        "distill.activation_memory_budget_layers")
    p.add_argument("--micro-batches", type=int, default=1, metavar="N",
                   help="split each step's batch into N micro-batches whose gradients accumulate before one optimizer "
                        "step, as distill grad_accum does (N must divide --batch-size)")
    p.add_argument("--out", type=Path, default=None)

    p = add(steps, "make-report", step_make_report, "tables, figures and report.md", uses_torch=False)
    p.add_argument("--title", required=True)
    p.add_argument("--evals", nargs="+", required=True, type=Path)
    p.add_argument("--efficiency", nargs="*", default=[], type=Path)
    p.add_argument("--selections", nargs="*", default=[], type=Path)
    p.add_argument("--importance", type=Path, default=None)
    p.add_argument("--early-stop", type=Path, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--report", required=True, type=Path)
