"""Racing the one-swap scores: a layer ranked far outside the top-K stops training partway through the budget.

Most of a selection pass's tokens go to layers that never come near the top-K. Once a set share of the scoring
budget is spent, every round drops the layers ranked below `keep` (a multiple of K) from further rounds; a
dropped layer keeps its last held-out KL in every later ranking. This is not exact: a layer that learns late
could be dropped before it climbs. `from_fraction` guards against that (early ranks move a lot: docs/results/).

Pure functions on a grid of held-out KLs, so the live decision and a replay of a reference run (every layer
scored in full) drop the same layers at the same rounds. No torch here (a local rule runs it).
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid_distill.select.layer_sets import ranking_from_importance


@dataclass(frozen=True)
class RaceRound:
    """One round of the race: what every layer counts as, and who trains on."""

    kl: list[float]          # each layer's held-out KL as of this round (a dropped layer keeps its last one)
    tokens: int              # stage-2 tokens every layer has trained so far, summed
    racing: frozenset[int]   # layers that train in the next round


def run_race(kl_grid: list[list[float]], token_grid: list[list[int]], keep: int | None,
             from_tokens: int, rounds_per_job: int = 1) -> list[RaceRound]:
    """Replay the race over rounds; kl_grid[r][l] and token_grid[r][l] are layer l's score at round r.

    `keep` None = no racing (every layer trains every round). A round that ends a live scoring job (every
    `rounds_per_job`-th) drops layers once its racing layers have trained at least `from_tokens` each; a job
    trains its rounds whatever they show. Where a dropped layer has a score for a later round (a reference run),
    that later score is ignored, so the result equals what the live race would have seen.
    """
    num_layers = len(kl_grid[0])
    if keep is not None and keep < 1:
        raise ValueError(f"racing: keep must be at least 1 layer, got {keep!r}")
    racing = set(range(num_layers))
    last_round = [0] * num_layers
    rounds = []
    for r, row in enumerate(kl_grid):
        if len(row) != num_layers or len(token_grid[r]) != num_layers:
            raise ValueError(f"racing: round {r} has {len(row)} scores for {num_layers} layers")
        for layer in racing:
            last_round[layer] = r
        kl = [kl_grid[last_round[layer]][layer] for layer in range(num_layers)]
        tokens = sum(token_grid[last_round[layer]][layer] for layer in range(num_layers))
        trained = min(token_grid[r][layer] for layer in racing)
        if keep is not None and trained >= from_tokens and (r + 1) % rounds_per_job == 0:
            ranking = ranking_from_importance({layer: -value for layer, value in enumerate(kl)})
            racing -= set(ranking[keep:])
        rounds.append(RaceRound(kl=kl, tokens=tokens, racing=frozenset(racing)))
    return rounds


def racing_settings(config: dict, k: int) -> tuple[int | None, int]:
    """(keep, from_tokens) from `scoring.racing`; keep None when racing is off."""
    race = config["scoring"]["racing"]
    if not race["enabled"]:
        return None, 0
    from_tokens = int(race["from_fraction"] * config["scoring"]["stage2"]["tokens"])
    return race["keep_factor"] * k, from_tokens
