"""GA-iter, iterative greedy addition: each step adds the layer whose restoration to softmax, on top of the
layers already picked, leaves the lowest held-out KL after a brief stage 2. Pure logic; I/O is in greedy_jobs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from hybrid_distill.select.layer_sets import ranking_from_importance


def best_candidate(heldout_kl: Mapping[int, float]) -> int:
    """The candidate with the lowest held-out KL; equal KL goes to the lower layer index."""
    return ranking_from_importance({layer: -kl for layer, kl in heldout_kl.items()})[0]


def greedy_step(chosen: Sequence[int], heldout_kl: Mapping[int, float], num_layers: int) -> list[int]:
    """The pick order after one more step; `heldout_kl` must score exactly the layers not yet chosen."""
    remaining = set(range(num_layers)) - set(chosen)
    if len(set(chosen)) != len(chosen) or not set(chosen) <= set(range(num_layers)):
        raise ValueError(f"greedy step: chosen layers {list(chosen)} are not distinct layers of 0..{num_layers - 1}")
    if set(heldout_kl) != remaining:
        raise ValueError(f"greedy step: scores cover layers {sorted(heldout_kl)} but the candidates after "
                         f"{list(chosen)} are {sorted(remaining)}")
    return [*chosen, best_candidate(heldout_kl)]


def greedy_layers(pick_order: Sequence[int], k: int) -> list[int]:
    """The K-layer set of GA-iter: the first K picks (so every K's set contains every smaller K's), ascending."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(pick_order):
        raise ValueError(f"greedy selection: K={k!r} needs {k!r} greedy steps but {len(pick_order)} were made")
    return sorted(pick_order[:k])
