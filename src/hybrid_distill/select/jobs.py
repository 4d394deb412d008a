"""Selection jobs: per-layer signals, the per-round early-stop decision, the ranking and chosen layer sets."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from hybrid_distill.distill.atomic import write_text_atomic
from hybrid_distill.distill.jobs import EVAL_BATCH, drop_training_state, open_data, write_json
from hybrid_distill.distill.objectives import heldout_kl
from hybrid_distill.models.checkpoint import load_hybrid
from hybrid_distill.models.student import decoder_layers, num_layers
from hybrid_distill.models.teacher import load_teacher
from hybrid_distill.select.bypass import act_mse_and_ppl_increase, task_drop
from hybrid_distill.select.early_stop import early_stop_decision
from hybrid_distill.select.importance import choose_layers, importance_csv
from hybrid_distill.select.layer_sets import top_k_layers

log = logging.getLogger(__name__)


class ScoreFileError(ValueError):
    """A score or decision file that is missing a field or is not JSON; the message names the file."""


def read_score(path: Path, field: str = "heldout_kl") -> dict:
    try:
        payload = json.loads(Path(path).read_text())
        float(payload[field])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"score file {path} is corrupt or incomplete ({type(error).__name__}: {error})") from None
    return payload


def signals_to_json(signals: dict[str, dict[int, float]]) -> dict:
    return {name: {str(layer): value for layer, value in values.items()} for name, values in signals.items()}


def signals_from_json(path: Path) -> dict[str, dict[int, float]]:
    try:
        payload = json.loads(Path(path).read_text())
        return {name: {int(layer): float(v) for layer, v in values.items()} for name, values in payload.items()}
    except (OSError, json.JSONDecodeError, AttributeError, ValueError) as error:
        raise ScoreFileError(f"signal file {path} is corrupt ({type(error).__name__}: {error})") from None


def score_bypass(config: dict, teacher_dir: Path, data_dir: Path, out_json: Path) -> None:
    """ACT-MSE, LM-PPL, AR and KV importances of the teacher's layers (bypass each, measure the loss)."""
    from hybrid_distill.evaluate.loading import resolve_device
    from hybrid_distill.evaluate.recall_tasks import generate_examples

    teacher, tokenizer = load_teacher(str(teacher_dir), device=resolve_device(None))
    count = config["selection"]["probe_sequences"]
    heldout = open_data(data_dir, "heldout")
    act_mse, ppl_increase = act_mse_and_ppl_increase(teacher, heldout.batch(0, min(count, heldout.num_sequences)))
    context = min(config["evaluate"]["context_lengths"])
    signals = {"act_mse": act_mse, "lm_ppl": ppl_increase}
    for name, task in (("ar", "associative_recall"), ("kv", "kv_retrieval")):
        examples = generate_examples(task, tokenizer, context, count, seed=config["seed"] + 17)
        signals[name] = task_drop(teacher, tokenizer, examples)
    write_json(out_json, signals_to_json(signals))


@contextmanager
def layer_mix(student, teacher, softmax_layers):
    """Temporarily give `student` the teacher's attention (shared, not copied) in `softmax_layers`."""
    layers = decoder_layers(student)
    saved = {i: layers[i].self_attn for i in softmax_layers}
    for i in softmax_layers:
        layers[i].self_attn = decoder_layers(teacher)[i].self_attn
    try:
        yield student
    finally:
        for i, module in saved.items():
            layers[i].self_attn = module


def score_stage1_signals(config: dict, teacher_dir: Path, data_dir: Path, stage1_dir: Path, out_json: Path) -> None:
    """GA-S1 (-KL of the stage-1 all-linear student with layer l restored) and GR-S1 (KL of the teacher with
    only layer l linear, stage-1 weights). Stage 1 is layer-local, so neither needs more training."""
    teacher, _ = load_teacher(str(teacher_dir))
    student = load_hybrid(stage1_dir)
    heldout = open_data(data_dir, "heldout")
    total = num_layers(teacher)

    def kl(model):
        return heldout_kl(model, teacher, heldout, config["scoring"]["heldout_sequences"], EVAL_BATCH,
                          config["distill"]["temperature"], config["distill"]["kl_chunk_tokens"])

    ga, gr = {}, {}
    for layer in range(total):
        with layer_mix(student, teacher, [layer]):
            ga[layer] = -kl(student)
        with layer_mix(student, teacher, [i for i in range(total) if i != layer]):
            gr[layer] = kl(student)
    write_json(out_json, signals_to_json({"ga_s1": ga, "gr_s1": gr}))


def snapshot_sets(round_files: list[list[Path]], k: int) -> list[set[int]]:
    """Top-K set of every round; round_files[r] lists the per-layer score files of round r, layer order."""
    sets = []
    for files in round_files:
        importance = {i: -read_score(path)["heldout_kl"] for i, path in enumerate(files)}
        sets.append(set(top_k_layers(importance, k)))
    return sets


def decide_round(config: dict, round_files: list[list[Path]], k: int, max_rounds: int, out_json: Path) -> dict:
    """The live early-stop decision after the last round in `round_files`: schedule another round or not."""
    rule = config["scoring"]["early_stop"]
    sets = snapshot_sets(round_files, k)
    decision = early_stop_decision(sets, k, window=rule["window"], min_mean_jaccard=rule["min_mean_jaccard"],
                                   min_backbone=rule["min_backbone"], max_union=rule["max_union"])
    current = len(sets) - 1
    fired = decision["snapshot"] is not None
    exhausted = read_score(round_files[-1][0]).get("budget_exhausted", False)
    stop = exhausted or current + 1 >= max_rounds or (rule["enabled"] and fired)
    step = read_score(round_files[-1][0])["step"]
    payload = {"round": current, "step": step, "k": k, "stop": stop, "fired": fired,
               "fired_round": decision["snapshot"], "top_k": sorted(sets[-1]),
               "mean_jaccard": decision["mean_jaccard"], "backbone": decision["backbone"],
               "union": decision["union"], "max_rounds": max_rounds}
    write_json(out_json, payload)
    if stop:  # no further round will resume these states
        for path in round_files[-1]:
            drop_training_state(Path(path).parent / "stage2")
        log.info("scoring stopped after round %d; per-layer training states removed", current)
    return payload


def rank_layers(score_files: list[Path], out_csv: Path) -> None:
    """importance.csv from the final round: importance = -held-out KL (GA-S2)."""
    kl = {i: read_score(path)["heldout_kl"] for i, path in enumerate(score_files)}
    write_text_atomic(Path(out_csv), importance_csv({i: -v for i, v in kl.items()}, kl))


def summarise_early_stop(config: dict, decision_files: list[Path], round_files: list[list[Path]],
                         tokens_full_budget: int, out_json: Path) -> None:
    """early_stop.json: when the rule fired (or would have), the Jaccard series and the tokens spent."""
    rule = config["scoring"]["early_stop"]
    decisions = [json.loads(Path(p).read_text()) for p in decision_files]
    last = decisions[-1]
    tokens_spent = sum(read_score(files[i])["tokens"] for files in round_files[-1:] for i in range(len(files)))
    rounds = [{key: d[key] for key in ("round", "step", "top_k")} for d in decisions]
    for entry in rounds:
        r = entry["round"]
        entry.update(mean_jaccard=last["mean_jaccard"][r], backbone=last["backbone"][r], union=last["union"][r])
    fired_round = last["fired_round"]
    payload = {
        "enabled": rule["enabled"], "k": last["k"], "window": rule["window"],
        "thresholds": {"min_mean_jaccard": rule["min_mean_jaccard"],
                       "min_backbone": rule["min_backbone"] if rule["min_backbone"] is not None else last["k"] - 1,
                       "max_union": rule["max_union"] if rule["max_union"] is not None else last["k"] + 1},
        "fired": last["fired"], "fired_round": fired_round,
        "fired_step": decisions[fired_round]["step"] if fired_round is not None else None,
        "stopped_at_round": last["round"], "rounds": rounds,
        "tokens_spent": tokens_spent, "tokens_full_budget": tokens_full_budget,
        "top_k": last["top_k"],
        "selection_cost": selection_cost(config, decisions, len(round_files[-1]), tokens_spent, tokens_full_budget),
    }
    write_json(out_json, payload)


def selection_cost(config: dict, decisions: list[dict], num_layers: int, tokens_spent: int,
                   tokens_full_budget: int) -> dict:
    """Tokens of this selection pass against the paper's protocol, and the top-K sets at the stop and at the end.

    The paper trains every one-swap student through the full stage 1 and stage 2 of a final model:
    L x (stage 1 + stage 2), ~25B tokens for a 36-layer teacher. Here stage 1 runs once: it is teacher-forced and
    layer-local, so a one-swap student's stage 1 equals the all-linear student's in every linear layer (an exact
    saving); stage 2 is the brief scoring budget, and it ends where the rule fires. `no_early_stop_tokens` is this
    config's pass without the rule. With the rule off the run goes on to the full budget, so `top_k_at_stop` vs
    `top_k_full_budget` shows what stopping would have changed; with the rule on and fired, the full-budget set was
    never computed (null).
    """
    last = decisions[-1]
    stop = last["fired_round"] if last["fired_round"] is not None else last["round"]
    tokens_to_stop = tokens_spent * decisions[stop]["step"] // last["step"]
    stage1 = config["distill"]["stage1"]["tokens"]
    paper = num_layers * (stage1 + config["distill"]["stage2"]["tokens"])
    ours = stage1 + tokens_to_stop
    stopped_early = config["scoring"]["early_stop"]["enabled"] and last["fired"]
    return {
        "paper_protocol_tokens": paper, "no_early_stop_tokens": stage1 + tokens_full_budget,
        "tokens_to_stop": ours, "fraction_of_paper": ours / paper,
        "stage1_tokens_shared": stage1, "stage2_tokens_to_stop": tokens_to_stop, "stop_round": stop,
        "top_k_at_stop": decisions[stop]["top_k"],
        "top_k_full_budget": None if stopped_early else last["top_k"],
        "swaps_between": None if stopped_early else len(set(last["top_k"]) - set(decisions[stop]["top_k"])),
    }


def select_layers(config: dict, selector: str, k: int, total_layers: int, out_json: Path, seed: int = 0,
                  signal_files: list[Path] = (), importance_file: Path | None = None,
                  pick_order: list[int] | None = None) -> list[int]:
    """Write the chosen softmax layers of one selector at one K (`pick_order`: GA-iter's greedy picks)."""
    signals: dict[str, dict[int, float]] = {}
    for path in signal_files:
        signals.update(signals_from_json(path))
    if importance_file is not None:
        signals["ga_s2"] = read_importance_csv(importance_file)
    layers = choose_layers(selector, k, total_layers, signals, seed=seed,
                           user_layers=config["selection"]["user_layers"], pick_order=pick_order)
    payload = {"selector": selector, "k": k, "seed": seed, "softmax_layers": layers,
               "importance": signals.get(selector)}
    if pick_order is not None:
        payload["pick_order"] = list(pick_order[:k])
    write_json(out_json, payload)
    return layers


def read_selection(path: Path) -> list[int]:
    try:
        return [int(i) for i in json.loads(Path(path).read_text())["softmax_layers"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"selection file {path} is corrupt ({type(error).__name__}: {error})") from None


def read_importance_csv(path: Path) -> dict[int, float]:
    import csv

    try:
        with open(path) as handle:
            return {int(row["layer"]): float(row["importance"]) for row in csv.DictReader(handle)}
    except (OSError, KeyError, ValueError) as error:
        raise ScoreFileError(f"importance file {path} is corrupt ({type(error).__name__}: {error})") from None


def removal_signal(score_files: list[Path], out_json: Path) -> None:
    """GR-S2: importance of layer l = held-out KL after linearising l alone and a brief stage 2."""
    kl = {i: read_score(path)["heldout_kl"] for i, path in enumerate(score_files)}
    write_json(out_json, signals_to_json({"gr_s2": kl}))

