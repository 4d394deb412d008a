"""`hybrid-distill <step>`: the steps the Snakemake rules run, each with explicit paths and values."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("hybrid_distill")


def layer_list(text: str) -> list[int]:
    """'3,7,11' -> [3, 7, 11]; '' or 'none' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _config(args):
    from hybrid_distill.config.load import load_config

    return load_config(args.config)


def step_prepare_teacher(args):
    from hybrid_distill.models.export import export_teacher

    config = _config(args)
    export_teacher(config["teacher"]["spec"], args.out, config["teacher"]["dtype"], args.expect_layers)


def step_prepare_data(args):
    from hybrid_distill.data.prepare import prepare_data
    from hybrid_distill.evaluate.loading import resolve_device
    from hybrid_distill.models.teacher import load_teacher

    config = _config(args)
    teacher, tokenizer = load_teacher(str(args.teacher), device=resolve_device(None))  # sampling wants the GPU
    data = config["data"]
    prepare_data(data["source"], tokenizer, args.out, data["seq_len"], data["train_sequences"],
                 data["heldout_sequences"], seed=config["seed"], teacher=teacher)


def step_distill_stage1(args):
    from hybrid_distill.distill.jobs import distill_all_linear_stage1

    distill_all_linear_stage1(_config(args), args.teacher, args.data, args.mixer, args.out)


def step_distill_stage2(args):
    from hybrid_distill.distill.jobs import distill_stage2

    softmax_layers = args.softmax_layers
    if args.selection is not None:
        from hybrid_distill.select.score_files import read_selection

        softmax_layers = read_selection(args.selection)
    distill_stage2(_config(args), args.stage, args.teacher, args.data, args.init, softmax_layers, args.out,
                   stop_after_step=args.stop_after_step, score_path=args.score_out, save_model=not args.no_model,
                   teacher_cache=args.teacher_cache, rounds_dir=args.score_rounds_dir, job_rounds=args.score_job_rounds)


def step_cache_teacher(args):
    from hybrid_distill.distill.jobs import cache_teacher_hidden

    cache_teacher_hidden(_config(args), args.teacher, args.data, args.out)


def step_score_bypass(args):
    from hybrid_distill.select.jobs import score_bypass

    score_bypass(_config(args), args.teacher, args.data, args.out)


def step_score_stage1(args):
    from hybrid_distill.select.jobs import score_stage1_signals

    score_stage1_signals(_config(args), args.teacher, args.data, args.stage1, args.out)


def _rounds(args) -> list[list[Path]]:
    """--scores lists round-major, layer-minor files; --layers says how many per round."""
    files = [Path(p) for p in args.scores]
    if len(files) % args.layers:
        raise SystemExit(f"check-round: {len(files)} score files is not a multiple of {args.layers} layers")
    return [files[i:i + args.layers] for i in range(0, len(files), args.layers)]


def step_check_round(args):
    from hybrid_distill.select.rounds import decide_every_round, decide_round

    rounds, config = _rounds(args), _config(args)
    if len(args.out) == 1:
        decide_round(config, rounds, args.k, args.max_rounds, args.out[0])
        return
    if len(args.out) != len(rounds):
        raise SystemExit(f"check-round: {len(args.out)} decision files for {len(rounds)} rounds of scores")
    for _ in decide_every_round(config, rounds, args.k, args.max_rounds, args.out):
        pass


def step_plan_selection(args):
    from hybrid_distill.models.teacher import describe_teacher
    from hybrid_distill.select.budget import format_budget, selection_budget

    config = _config(args)
    _, layers = describe_teacher(config["teacher"]["spec"], config["teacher"]["num_layers"])
    print(format_budget(selection_budget(config, layers), config["run"]))


def step_rank_layers(args):
    from hybrid_distill.select.rounds import rank_layers

    rank_layers([Path(p) for p in args.scores], args.out)


def step_write_early_stop(args):
    from hybrid_distill.select.rounds import summarise_early_stop

    summarise_early_stop(_config(args), [Path(p) for p in args.decisions], _rounds(args), args.full_budget, args.out)


def step_removal_signal(args):
    from hybrid_distill.select.selections import removal_signal

    removal_signal([Path(p) for p in args.scores], args.out)


def step_choose_greedy_layer(args):
    from hybrid_distill.select.greedy_jobs import choose_greedy_layer

    choose_greedy_layer(args.step_index, args.num_layers, args.candidates, [Path(p) for p in args.scores], args.out,
                        previous_file=args.previous, drop_states=args.drop_states)


def step_select_layers(args):
    from hybrid_distill.select.selections import select_layers

    pick_order = None
    if args.greedy is not None:
        from hybrid_distill.select.greedy_jobs import read_greedy_choice

        pick_order = read_greedy_choice(args.greedy)["chosen"]
    select_layers(args.selector, args.k, args.num_layers, args.out, seed=args.seed, user_layers=args.user_layers,
                  signal_files=[Path(p) for p in args.signals], importance_file=args.importance,
                  pick_order=pick_order)


def _add(subparsers, name, function, help_text, uses_torch=True):
    """A step; `uses_torch=False` marks the bookkeeping steps of local rules, which start without importing torch."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(function=function, uses_torch=uses_torch)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-distill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the job, split among the processes of an `accelerate "
                             "launch` (default: Slurm's cpus-per-task, else all cores)")
    steps = parser.add_subparsers(dest="step", required=True, metavar="<step>")

    p = _add(steps, "prepare-teacher", step_prepare_teacher, "export the teacher as a local HF directory")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--expect-layers", type=int, default=None, help="fail unless the teacher has this many layers")

    p = _add(steps, "prepare-data", step_prepare_data, "pack the training and held-out token streams")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "distill-stage1", step_distill_stage1, "stage 1 (hidden-state alignment) of the all-linear student")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--mixer", required=True, choices=["gdn", "gla"])
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "distill-stage2", step_distill_stage2, "stage 2 (logit KL) from a stage-1 student")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--stage", required=True, choices=["distill.stage2", "scoring.stage2"])
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--init", required=True, type=Path, help="stage-1 checkpoint directory")
    layers = p.add_mutually_exclusive_group(required=True)
    layers.add_argument("--softmax-layers", type=layer_list, help="layers restored to softmax, e.g. 3,7 (or none)")
    layers.add_argument("--selection", type=Path, help="a selection JSON whose softmax_layers are restored")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stop-after-step", type=int, default=None, help="end this job at this step (rounds)")
    p.add_argument("--score-out", type=Path, default=None, help="write the held-out KL score here")
    p.add_argument("--score-rounds-dir", type=Path, default=None,
                   help="score every round (DIR/round{r}.json every scoring.snapshot_every steps) in this one job")
    p.add_argument("--score-job-rounds", action="store_true",
                   help="a live one-swap job: --score-out carries every round this job trains "
                        "(scoring.snapshots_per_job)")
    p.add_argument("--no-model", action="store_true", help="keep only the training state, save no model")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="the teacher's cached hidden states (cache-teacher's --out) for the rows it holds")

    p = _add(steps, "cache-teacher", step_cache_teacher,
             "cache the teacher's final hidden states of the training rows stage 2 reads")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="the cache's .bin (its .json sidecar goes beside it)")

    p = _add(steps, "score-bypass", step_score_bypass, "ACT-MSE, LM-PPL, AR and KV layer importances")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "score-stage1", step_score_stage1, "GA-S1 and GR-S1 importances from the stage-1 student")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--stage1", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "check-round", step_check_round, "early-stop decision after a scoring round", uses_torch=False)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--layers", required=True, type=int)
    p.add_argument("--k", required=True, type=int)
    p.add_argument("--max-rounds", required=True, type=int)
    p.add_argument("--scores", required=True, nargs="+", help="score files, round-major then layer order")
    p.add_argument("--out", required=True, type=Path, nargs="+",
                   help="the last round's decision file, or one per round (round order) to decide them all")

    p = _add(steps, "plan-selection", step_plan_selection,
             "before a run: the selection pass's scoring jobs and tokens against the paper's protocol, at its bounds",
             uses_torch=False)
    p.add_argument("--config", required=True, type=Path)

    p = _add(steps, "rank-layers", step_rank_layers, "importance.csv from the final one-swap scores", uses_torch=False)
    p.add_argument("--scores", required=True, nargs="+", help="one score file per layer, in layer order")
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "write-early-stop", step_write_early_stop,
             "early_stop.json from the round decisions", uses_torch=False)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--layers", required=True, type=int)
    p.add_argument("--decisions", required=True, nargs="+")
    p.add_argument("--scores", required=True, nargs="+", help="score files of the final round, layer order")
    p.add_argument("--full-budget", required=True, type=int, help="tokens of scoring every layer in full")
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "removal-signal", step_removal_signal,
             "GR-S2 importances from greedy-removal scores", uses_torch=False)
    p.add_argument("--scores", required=True, nargs="+")
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "choose-greedy-layer", step_choose_greedy_layer,
             "GA-iter: one greedy step's pick from its candidates' brief stage-2 scores", uses_torch=False)
    p.add_argument("--step", dest="step_index", metavar="STEP", required=True, type=int,
                   help="greedy step, 0 = first pick")
    p.add_argument("--num-layers", required=True, type=int)
    p.add_argument("--candidates", required=True, type=layer_list, help="layers scored this step, e.g. 0,2,3")
    p.add_argument("--scores", required=True, nargs="+", help="one score file per candidate, in that order")
    p.add_argument("--previous", type=Path, default=None, help="the previous step's file (every step but 0)")
    p.add_argument("--drop-states", action="store_true", help="delete the scoring jobs' training states")
    p.add_argument("--out", required=True, type=Path)

    p = _add(steps, "select-layers", step_select_layers,
             "write one selector's softmax layers at one K", uses_torch=False)
    p.add_argument("--selector", required=True)
    p.add_argument("--k", required=True, type=int)
    p.add_argument("--num-layers", required=True, type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signals", nargs="*", default=[])
    p.add_argument("--importance", type=Path, default=None)
    p.add_argument("--greedy", type=Path, default=None, help="GA-iter: a greedy step file listing the pick order")
    p.add_argument("--user-layers", type=layer_list, default=[], help="the `user` selector's layers, e.g. 0,3")
    p.add_argument("--out", required=True, type=Path)

    from hybrid_distill import cli_more
    from hybrid_distill.submit import add_submit_step

    cli_more.add_steps(steps, _add)
    add_submit_step(steps, _add)
    return parser


def threads_per_process(threads: int, processes: int) -> int:
    """The job's CPU threads shared among the processes `accelerate launch` started on its node, at least one each."""
    return max(1, threads // max(1, processes))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = args.threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads and args.uses_torch:
        import torch

        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by `accelerate launch` for several
        torch.set_num_threads(threads_per_process(int(threads), processes))
        log.debug("torch threads: %d (%s for %d processes)", torch.get_num_threads(), threads, processes)
    if args.uses_torch:
        from hybrid_distill.kernel_cache import describe_kernel_cache

        log.info(describe_kernel_cache())
    from hybrid_distill.errors import USER_ERRORS

    try:
        args.function(args)
    except USER_ERRORS as error:
        print(f"hybrid-distill {args.step}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
