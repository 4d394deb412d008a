"""Scoring rounds: the early-stop decision after each round, the ranking of the last one and early_stop.json.

These run as local rules between rounds (on a cluster's head node), so nothing here imports torch.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from hybrid_distill.distill.atomic import drop_training_state, write_json, write_text_atomic
from hybrid_distill.select.budget import job_end
from hybrid_distill.select.early_stop import early_stop_decision, resolved_limits
from hybrid_distill.select.importance import importance_csv, ranking_from_importance
from hybrid_distill.select.layer_sets import top_k_layers
from hybrid_distill.select.racing import racing_settings, run_race
from hybrid_distill.select.score_files import ScoreFileError, read_score

log = logging.getLogger(__name__)


def read_grid(round_files: list[list[Path]]) -> tuple[list[list[dict]], list[list[float]], list[list[int]]]:
    """Every layer's score at every round, and its held-out KL and tokens trained, as grids [round][layer].

    round_files[i] lists one score file per layer. A file written by a live job that trained several rounds
    (`scoring.snapshots_per_job`) carries each of its rounds' scores (`snapshots`) and stands for all of them; a
    raced-out layer's file, repeated from an earlier job, counts with its last score in each of them.
    """
    scores = []
    for files in round_files:
        payloads = [read_score(path) for path in files]
        snapshots = [payload.get("snapshots") or [payload] for payload in payloads]
        newest = max(payload["step"] for payload in payloads)
        rounds = max(len(s) for s, payload in zip(snapshots, payloads) if payload["step"] == newest)
        for path, s, payload in zip(files, snapshots, payloads):
            if payload["step"] == newest and len(s) != rounds:
                raise ScoreFileError(f"score file {path} holds {len(s)} rounds where this job's other layers "
                                     f"hold {rounds}; rerun its job")
        scores += [[s[i] if payload["step"] == newest else s[-1] for s, payload in zip(snapshots, payloads)]
                   for i in range(rounds)]
    kl = [[float(score["heldout_kl"]) for score in row] for row in scores]
    tokens = [[int(score["tokens"]) for score in row] for row in scores]
    return scores, kl, tokens


def lowest_kl_layers(kl: list[float], k: int) -> list[int]:
    return top_k_layers([-value for value in kl], k)


def decide_round(config: dict, round_files: list[list[Path]], k: int, max_rounds: int, out_json: Path) -> dict:
    """The live early-stop decision after the last round in `round_files`: schedule another round or not, and
    for whom (`racing`). round_files[r] lists one score file per layer; a layer out of the race repeats its last."""
    return _decide(config, round_files, *read_grid(round_files), k, max_rounds, out_json)


def decide_every_round(config: dict, round_files: list[list[Path]], k: int, max_rounds: int,
                       outs: list[Path]) -> Iterator[dict]:
    """Round r's decision into outs[r], in turn, as live checkpoints after every round would make them; the files
    are read once. For a reference run (one file per layer and round)."""
    grids = read_grid(round_files)
    for last, out in enumerate(outs):
        yield _decide(config, round_files[:last + 1], *(grid[:last + 1] for grid in grids), k, max_rounds, out)


def _decide(config: dict, round_files: list[list[Path]], scores: list[list[dict]], kl: list[list[float]],
            tokens: list[list[int]], k: int, max_rounds: int, out_json: Path) -> dict:
    rule = config["scoring"]["early_stop"]
    per_job = config["scoring"]["snapshots_per_job"]
    keep, from_tokens = racing_settings(config, k)
    race = run_race(kl, tokens, keep, from_tokens, per_job)
    sets = [set(lowest_kl_layers(entry.kl, k)) for entry in race]  # a dropped layer counts with its last score
    decision = early_stop_decision(sets, k, window=rule["window"], min_mean_jaccard=rule["min_mean_jaccard"],
                                   min_backbone=rule["min_backbone"], max_union=rule["max_union"])
    current = len(sets) - 1
    fired = decision["snapshot"] is not None
    steps = [max(score["step"] for score in row) for row in scores]  # of the layers that trained each round
    exhausted = any(score.get("budget_exhausted", False) for score in scores[-1] if score["step"] == steps[-1])
    stop_round = job_end(decision["snapshot"], per_job, max_rounds) if fired else None
    stop = exhausted or current + 1 >= max_rounds or (rule["enabled"] and stop_round == current)
    history = [{"round": r, "step": steps[r], "top_k": sorted(sets[r]), "tokens": race[r].tokens,
                "racing_layers": len(race[r].racing)} for r in range(current + 1)]
    payload = {"round": current, "step": steps[-1], "k": k, "stop": stop, "fired": fired,
               "fired_round": decision["snapshot"], "stop_round": stop_round, "top_k": sorted(sets[-1]),
               "mean_jaccard": decision["mean_jaccard"], "backbone": decision["backbone"],
               "union": decision["union"], "max_rounds": max_rounds, "tokens": race[-1].tokens,
               "racing": sorted(race[-1].racing), "top_k_as_scored": lowest_kl_layers(kl[-1], k),
               "history": history}
    write_json(out_json, payload)
    log.info("%s", round_progress(payload, rule))
    every_layer = frozenset(range(len(kl[-1])))
    left = every_layer if stop else (race[-2].racing if current else every_layer) - race[-1].racing
    for layer in sorted(left):  # no later round resumes these states
        drop_training_state(Path(round_files[-1][layer]).parent / "stage2")
    if stop:
        log.info("scoring stopped after round %d; per-layer training states removed", current)
    elif left:
        log.info("round %d: layers %s leave the race; %d race on", current, sorted(left), len(race[-1].racing))
    return payload


def round_progress(decision: dict, rule: dict) -> str:
    """One log line per scoring round: where the rolling-Jaccard rule stands and what comes next, so a user who
    watches a long selection pass sees how near it is to stopping."""
    current, k = decision["round"], decision["k"]
    min_backbone, max_union = resolved_limits(k, rule["min_backbone"], rule["max_union"])
    mean, backbone, union = (decision[key][current] for key in ("mean_jaccard", "backbone", "union"))
    if mean is None:
        window = f"{current + 1} of the {rule['window']} snapshots the rule's window needs"
    else:
        window = (f"last {rule['window']} snapshots: mean Jaccard {mean:.2f} (needs >= {rule['min_mean_jaccard']}), "
                  f"backbone {backbone} (>= {min_backbone}), union {union} (<= {max_union})")
    fired = f"the rule fired at round {decision['fired_round']}" if decision["fired"] else ""
    if decision["stop"]:
        ruled = rule["enabled"] and decision["stop_round"] == current
        outcome = f"stop: {fired}" if ruled else "stop: the scoring budget is spent" + (f" ({fired})" if fired else "")
    else:
        outcome = "another round" + (f" ({fired}; early stop is off)" if fired else "")
    return (f"round {current} (step {decision['step']}, {decision['tokens']:,} tokens so far, "
            f"{len(decision['racing'])} layers racing): top-{k} {decision['top_k']}; {window} -> {outcome}")


def rank_layers(score_files: list[Path], out_csv: Path) -> None:
    """importance.csv from the final round: importance = -held-out KL (GA-S2)."""
    kl = {i: read_score(path)["heldout_kl"] for i, path in enumerate(score_files)}
    importance = {i: -v for i, v in kl.items()}
    write_text_atomic(Path(out_csv), importance_csv(importance, kl))
    log.info("layers by one-swap held-out KL, best first: %s",
             ", ".join(f"{layer} ({kl[layer]:.4g})" for layer in ranking_from_importance(importance)))


def summarise_early_stop(config: dict, decision_files: list[Path], round_files: list[list[Path]],
                         tokens_full_budget: int, out_json: Path) -> None:
    """early_stop.json: when the rule fired (or would have), the Jaccard series and the tokens spent."""
    rule = config["scoring"]["early_stop"]
    last = json.loads(Path(decision_files[-1]).read_text())  # its history covers every round before it
    tokens_spent = sum(read_score(files[i])["tokens"] for files in round_files[-1:] for i in range(len(files)))
    rounds = [{**{key: entry[key] for key in ("round", "step", "top_k", "tokens")},
               "mean_jaccard": last["mean_jaccard"][entry["round"]], "backbone": last["backbone"][entry["round"]],
               "union": last["union"][entry["round"]], "racing_layers": entry["racing_layers"]}
              for entry in last["history"]]
    fired_round = last["fired_round"]
    min_backbone, max_union = resolved_limits(last["k"], rule["min_backbone"], rule["max_union"])
    payload = {
        "enabled": rule["enabled"], "k": last["k"], "window": rule["window"],
        "thresholds": {"min_mean_jaccard": rule["min_mean_jaccard"], "min_backbone": min_backbone,
                       "max_union": max_union},
        "fired": last["fired"], "fired_round": fired_round,
        "fired_step": rounds[fired_round]["step"] if fired_round is not None else None,
        "stopped_at_round": last["round"], "snapshots_per_job": config["scoring"]["snapshots_per_job"],
        "rounds": rounds,
        "tokens_spent": tokens_spent, "tokens_full_budget": tokens_full_budget,
        "top_k": last["top_k"],
        "racing": dict(zip(("keep", "from_tokens"), racing_settings(config, last["k"]))),
        "selection_cost": selection_cost(config, last, len(round_files[-1]), tokens_spent, tokens_full_budget),
    }
    write_json(out_json, payload)
    log.info("%s", selection_summary(payload))


def selection_summary(early_stop: dict) -> str:
    """early_stop.json in one log line: the chosen set, why the pass stopped, and its cost against the paper's."""
    cost = early_stop["selection_cost"]
    if early_stop["fired"]:
        why = f"the rule fired at round {early_stop['fired_round']} (step {early_stop['fired_step']})"
    else:
        why = "the rule did not fire"
    line = (f"selection pass: top-{early_stop['k']} {early_stop['top_k']} after round "
            f"{early_stop['stopped_at_round']}; {why}; {cost['tokens_to_stop']:,} tokens to stop, "
            f"{cost['fraction_of_paper']:.1%} of the paper protocol's {cost['paper_protocol_tokens']:,}")
    if cost["top_k_full_budget"] is not None and early_stop["fired"]:  # a reference run: what stopping would change
        line += (f"; at the stop {cost['top_k_at_stop']}, at the full budget {cost['top_k_full_budget']}: "
                 f"{cost['swaps_between']} swap(s)")
    return line


def selection_cost(config: dict, last: dict, num_layers: int, tokens_spent: int, tokens_full_budget: int) -> dict:
    """Tokens of this selection pass against the paper's protocol, and the top-K sets at the stop and at the end.

    The paper trains every one-swap student through the full stage 1 and stage 2 of a final model: L x (stage 1 +
    stage 2), ~25B tokens for a 36-layer teacher. Here stage 1 runs once: it is teacher-forced and layer-local, so a
    one-swap student's stage 1 equals the all-linear student's in every linear layer (an exact saving); stage 2 is
    the brief scoring budget, and it ends where the rule fires (at the end of the live job that scored that round);
    with `scoring.racing` the layers far outside the top-K stop sooner (each round's `tokens`).
    `no_early_stop_tokens` is this config's pass without the rule or racing. With the rule off the run goes on to
    the full budget, so `top_k_at_stop` vs `top_k_full_budget` shows what stopping would have changed; with the rule
    on and fired, the full-budget set was never computed (null).
    """
    history = last["history"]
    stop = last["stop_round"] if last["stop_round"] is not None else last["round"]
    tokens_to_stop = history[stop]["tokens"]
    stage1 = config["distill"]["stage1"]["tokens"]
    paper = num_layers * (stage1 + config["distill"]["stage2"]["tokens"])
    ours = stage1 + tokens_to_stop
    stopped_early = config["scoring"]["early_stop"]["enabled"] and last["fired"]
    full_budget = last["top_k_as_scored"]  # a reference run's raced-out layers trained on: their true last scores
    return {
        "paper_protocol_tokens": paper, "no_early_stop_tokens": stage1 + tokens_full_budget,
        "tokens_to_stop": ours, "fraction_of_paper": ours / paper,
        "stage1_tokens_shared": stage1, "stage2_tokens_to_stop": tokens_to_stop, "stop_round": stop,
        "top_k_at_stop": history[stop]["top_k"],
        "top_k_full_budget": None if stopped_early else full_budget,
        "swaps_between": None if stopped_early else len(set(full_budget) - set(history[stop]["top_k"])),
    }
