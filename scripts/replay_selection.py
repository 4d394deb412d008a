"""Replay a reference run's one-swap scores under other early-stop or racing settings, without a GPU.

A reference run (`scoring.early_stop.enabled: false`) trains every layer through the whole scoring budget and
keeps every round's held-out KL. Each layer's scoring is independent of the others, so what a live run with other
rule or racing settings would have decided is a replay of those files: the same decision code runs here, round by
round, and writes the early_stop.json that run would have written (its `selection_cost` against the paper's
protocol, and the reference run's full-budget set beside the set at the stop).

    python scripts/replay_selection.py --run results/smollm2-same-set/gdn --config racing.yaml --out replay/
    python scripts/replay_selection.py --round-scores docs/results/same_set_h200/round_scores.csv \
        --tokens-per-step 8192 --config racing.yaml --out replay/

--run also writes the run's round_scores.csv (layer, kl_step<N>...) into --out, the form results are kept in.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import tempfile
from pathlib import Path

from hybrid_distill.config.load import load_config
from hybrid_distill.select.rounds import decide_every_round, summarise_early_stop


def grid_from_run(run_dir: Path) -> tuple[list[list[float]], list[int], int]:
    """(kl[round][layer], steps, tokens per step) from a reference run's swap/layer*/round*.json files."""
    layers = sorted((run_dir / "swap").glob("layer*"), key=lambda p: int(p.name[5:]))
    scores = [[json.loads(path.read_text()) for path in sorted(layer.glob("round*.json"),
                                                                key=lambda p: int(p.stem[5:]))] for layer in layers]
    if not scores or len({len(rounds) for rounds in scores}) != 1:
        raise SystemExit(f"{run_dir}: every layer needs the same rounds of a reference run")
    first = scores[0][0]
    kl = [[scores[layer][r]["heldout_kl"] for layer in range(len(layers))] for r in range(len(scores[0]))]
    return kl, [entry["step"] for entry in scores[0]], first["tokens"] // first["step"]


def grid_from_csv(path: Path) -> tuple[list[list[float]], list[int]]:
    with open(path) as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["layer"]))
    columns = [column for column in rows[0] if re.fullmatch(r"kl_step\d+", column)]
    return [[float(row[c]) for row in rows] for c in columns], [int(c[len("kl_step"):]) for c in columns]


def write_csv(path: Path, kl: list[list[float]], steps: list[int]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *(f"kl_step{step}" for step in steps)])
        for layer in range(len(kl[0])):
            writer.writerow([layer, *(f"{row[layer]:.6f}" for row in kl)])


def replay(config: dict, kl: list[list[float]], steps: list[int], tokens_per_step: int, k: int, out: Path) -> dict:
    """Write the reference grid as score files, decide every round as the live checkpoints would, summarise."""
    num_layers, rounds = len(kl[0]), len(kl)
    with tempfile.TemporaryDirectory() as scratch:
        files = []
        for r, (row, step) in enumerate(zip(kl, steps)):
            paths = []
            for layer, value in enumerate(row):
                path = Path(scratch) / f"layer{layer}" / f"round{r}.json"
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps({"heldout_kl": value, "step": step, "tokens": step * tokens_per_step,
                                            "budget_exhausted": r == rounds - 1}))
                paths.append(path)
            files.append(paths)
        decision_files = [Path(scratch) / f"decision{r}.json" for r in range(rounds)]
        decisions = []
        for path, decision in zip(decision_files, decide_every_round(config, files, k, rounds, decision_files)):
            decisions.append(path)
            if decision["stop"]:
                break
        summarise_early_stop(config, decisions, files[:len(decisions)], num_layers * steps[-1] * tokens_per_step,
                             out / "early_stop.json")
    return json.loads((out / "early_stop.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a reference run's mixer directory, e.g. results/<run>/gdn")
    source.add_argument("--round-scores", type=Path, help="round_scores.csv of a reference run")
    parser.add_argument("--tokens-per-step", type=int, help="stage-2 tokens per step and layer (with --round-scores)")
    parser.add_argument("--config", required=True, type=Path, help="the run's config with the settings to replay")
    parser.add_argument("--k", type=int, help="K the rule watches (default: scoring.early_stop.k or the smallest K)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if args.run:
        kl, steps, tokens_per_step = grid_from_run(args.run)
    elif args.tokens_per_step:
        (kl, steps), tokens_per_step = grid_from_csv(args.round_scores), args.tokens_per_step
    else:
        parser.error("--round-scores needs --tokens-per-step")
    config = load_config(args.config)
    k = args.k or config["scoring"]["early_stop"]["k"] or min(config["selection"]["ks"], default=None)
    if k is None:
        parser.error(f"{args.config}: no scoring.early_stop.k or selection.ks; pass --k")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run:
        write_csv(args.out / "round_scores.csv", kl, steps)
    summary = replay(config, kl, steps, tokens_per_step, k, args.out)
    cost = summary["selection_cost"]
    print(f"stop at round {cost['stop_round']} (step {summary['rounds'][cost['stop_round']]['step']}): "
          f"top-{k} {cost['top_k_at_stop']}, full budget {cost['top_k_full_budget']}, "
          f"{cost['swaps_between']} swaps; tokens {cost['tokens_to_stop']:,} of the paper protocol's "
          f"{cost['paper_protocol_tokens']:,} ({cost['fraction_of_paper']:.1%})")


if __name__ == "__main__":
    main()
