"""What a selection pass will cost before it runs: one-swap scoring's jobs and tokens against the paper's protocol.

A dry run cannot show it, because checkpoints plan the live scoring jobs as the run goes. This is the arithmetic the
workflow follows (rules/common.smk takes its step, round and job counts from here), evaluated at the two bounds
nobody knows in advance: the rule firing at its first chance, and never. No torch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from hybrid_distill.select.layer_sets import k_from_ratio
from hybrid_distill.select.racing import racing_settings


def tokens_per_step(config: dict, section: dict) -> int:
    """Tokens of one optimizer step of a stage on one process."""
    return section["micro_batch_size"] * section["grad_accum"] * config["data"]["seq_len"]


def stage_steps(config: dict, section: dict) -> int:
    """Optimizer steps of a stage on one process (more processes only shorten it)."""
    return max(1, section["tokens"] // tokens_per_step(config, section))


def scoring_rounds(config: dict) -> tuple[int, int]:
    """(scoring steps per one-swap student, rounds): a held-out snapshot every `snapshot_every` steps and at the end."""
    steps = stage_steps(config, config["scoring"]["stage2"])
    return steps, math.ceil(steps / config["scoring"]["snapshot_every"])


def job_end(round: int, rounds_per_job: int, max_rounds: int) -> int:
    """The last round of the live scoring job that trains `round`: where a live run can stop."""
    return min((round // rounds_per_job + 1) * rounds_per_job, max_rounds) - 1


def job_ends(max_rounds: int, rounds_per_job: int) -> list[int]:
    """The rounds that end live scoring jobs (a job trains `rounds_per_job` rounds; the last may train fewer)."""
    return [min(end, max_rounds) - 1 for end in range(rounds_per_job, max_rounds + rounds_per_job, rounds_per_job)]


def early_stop_k(config: dict, num_layers: int) -> int:
    """The K the rule watches: scoring.early_stop.k, else the smallest K of the run."""
    selection = config["selection"]
    ks = {k_from_ratio(num_layers, ratio) for ratio in selection["ratios"]} | set(selection["ks"])
    if not (config["scoring"]["early_stop"]["k"] or ks):
        raise ValueError("selection.ratios and selection.ks give no K, and scoring.early_stop.k is not set")
    return config["scoring"]["early_stop"]["k"] or min(ks)


@dataclass(frozen=True)
class PassCost:
    """Scoring jobs and stage-2 tokens of a selection pass that stops after round `stop_round`."""

    stop_round: int
    stop_step: int
    jobs: int
    stage2_tokens: int
    tokens: int            # with the one shared stage 1
    fraction_of_paper: float


@dataclass(frozen=True)
class SelectionBudget:
    layers: int
    k: int
    steps: int
    tokens_per_step: int
    snapshot_every: int
    rounds: int
    rounds_per_job: int
    racing_keep: int | None       # layers that race on once racing starts; None = no racing
    racing_from_step: int | None  # the job end where racing drops the others
    paper_protocol_tokens: int
    earliest: PassCost            # the rule fires as soon as a full window exists
    never: PassCost               # the rule never fires (scoring runs the whole budget, racing still applies)
    unraced: PassCost             # the rule off (a reference run: one job per layer, whole budget)
    live: bool                    # scoring.early_stop.enabled: which rows this config runs


def selection_budget(config: dict, num_layers: int) -> SelectionBudget:
    scoring = config["scoring"]
    steps, rounds = scoring_rounds(config)
    every, per_job = scoring["snapshot_every"], scoring["snapshots_per_job"]
    step_tokens = tokens_per_step(config, scoring["stage2"])
    k = early_stop_k(config, num_layers)
    keep, from_tokens = racing_settings(config, k)
    ends = job_ends(rounds, per_job)

    def step_after(round: int) -> int:
        return min((round + 1) * every, steps)

    drop = None
    if keep is not None and keep < num_layers:
        drop = next((end for end in ends if step_after(end) * step_tokens >= from_tokens), None)
    stage1 = config["distill"]["stage1"]["tokens"]
    paper = num_layers * (stage1 + config["distill"]["stage2"]["tokens"])

    def cost(stop: int, racing: bool) -> PassCost:
        racing = racing and drop is not None and drop < stop
        jobs_all = sum(1 for end in ends if end <= (drop if racing else stop))
        jobs_kept = sum(1 for end in ends if (drop if racing else stop) < end <= stop)
        layer_steps = (num_layers * step_after(drop) + keep * (step_after(stop) - step_after(drop)) if racing
                       else num_layers * step_after(stop))
        stage2_tokens = layer_steps * step_tokens
        return PassCost(stop_round=stop, stop_step=step_after(stop),
                        jobs=num_layers * jobs_all + (keep if racing else num_layers) * jobs_kept,
                        stage2_tokens=stage2_tokens, tokens=stage1 + stage2_tokens,
                        fraction_of_paper=(stage1 + stage2_tokens) / paper)

    earliest = job_end(min(scoring["early_stop"]["window"], rounds) - 1, per_job, rounds)  # a full window
    return SelectionBudget(
        layers=num_layers, k=k, steps=steps, tokens_per_step=step_tokens, snapshot_every=every, rounds=rounds,
        rounds_per_job=per_job, racing_keep=keep if drop is not None else None,
        racing_from_step=step_after(drop) if drop is not None else None, paper_protocol_tokens=paper,
        earliest=cost(earliest, racing=True), never=cost(rounds - 1, racing=True),
        unraced=replace(cost(rounds - 1, racing=False), jobs=num_layers), live=scoring["early_stop"]["enabled"])


def format_budget(budget: SelectionBudget, run: str) -> str:
    b = budget
    lines = [
        f"selection pass of `{run}`: {b.layers} layers, the rule watches top-{b.k}",
        f"one-swap scoring: {b.steps} stage-2 steps of {b.tokens_per_step:,} tokens per layer, a snapshot every "
        f"{b.snapshot_every} steps ({b.rounds} rounds), {b.rounds_per_job} round(s) per live job",
        (f"racing: after the job ending at step {b.racing_from_step}, the best {b.racing_keep} layers race on"
         if b.racing_keep is not None else "racing: off"),
        ("this config runs the rule live: between the first two rows" if b.live else
         "this config is a reference run (scoring.early_stop.enabled: false): the third row"),
        "",
        "| pass | stops after | scoring jobs | stage-2 tokens | with stage 1 | of the paper protocol |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = [("live: the rule fires at its first chance", b.earliest), ("live: the rule never fires", b.never),
            ("rule off: one job per layer, no racing", b.unraced)]
    for name, cost in rows:
        lines.append(f"| {name} | step {cost.stop_step} | {cost.jobs:,} | {cost.stage2_tokens:,} | {cost.tokens:,} | "
                     f"{cost.fraction_of_paper:.1%} |")
    lines.append(f"| paper protocol (every layer: stage 1 + final stage 2) | - | - | - | "
                 f"{b.paper_protocol_tokens:,} | 100% |")
    return "\n".join(lines)
