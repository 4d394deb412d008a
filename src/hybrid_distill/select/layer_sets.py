"""Which layers stay softmax: K from a ratio, top-K, uniform and random layouts, rank averaging.

All functions are pure and index layers from 0 (the first decoder layer) to num_layers - 1.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np


def _round_half_up(value: Fraction) -> int:
    """Round to the nearest integer, halves going up (Python's round() sends 4.5 to 4, this sends it to 5)."""
    return math.floor(value + Fraction(1, 2))


def _check_count(num_layers: int, k: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"k must be an integer in [1, {num_layers}], got {k!r}")


def k_from_ratio(num_layers: int, ratio: float) -> int:
    """K = round(L * ratio) with halves rounded up (not Python's half-to-even), and at least 1.

    The ratio is read as the decimal it was written as (0.125 is exactly 1/8), so float noise never
    moves a result across a half: k_from_ratio(36, 0.125) == 5, k_from_ratio(28, 0.25) == 7.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, Fraction)):
        raise ValueError(f"softmax ratio must be a number in (0, 1], got {ratio!r}")
    exact = ratio if isinstance(ratio, Fraction) else Fraction(str(ratio))
    if not 0 < exact <= 1:
        raise ValueError(f"softmax ratio must be in (0, 1], got {ratio!r}")
    return max(1, _round_half_up(num_layers * exact))


def _importance_items(importance: Mapping[int, float] | Sequence[float]) -> list[tuple[int, float]]:
    items = list(importance.items()) if isinstance(importance, Mapping) else list(enumerate(importance))
    if not items:
        raise ValueError("importance is empty: no layers to rank")
    for layer, score in items:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"importance has an invalid layer index {layer!r}")
        if not math.isfinite(float(score)):
            raise ValueError(f"importance of layer {layer} is not finite ({score!r})")
    return [(int(layer), float(score)) for layer, score in items]


def ranking_from_importance(importance: Mapping[int, float] | Sequence[float]) -> list[int]:
    """All layers, most important first; equal importance goes to the lower layer index first."""
    return [layer for layer, _ in sorted(_importance_items(importance), key=lambda item: (-item[1], item[0]))]


def top_k_layers(importance: Mapping[int, float] | Sequence[float], k: int) -> list[int]:
    """The k most important layers (ties to the lower index), sorted ascending."""
    ranking = ranking_from_importance(importance)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranking):
        raise ValueError(f"k must be an integer in [1, {len(ranking)}] (layers scored), got {k!r}")
    return sorted(ranking[:k])


def uniform_layers(num_layers: int, k: int) -> list[int]:
    """Evenly spaced softmax layers: the last layer of each of K blocks of L/K layers.

    Layer i (0-based) of the K is round_half_up((i + 1) * L / K) - 1, so L = 8, K = 2 gives [3, 7]
    (the usual "every n-th layer is softmax" layout); the final layer is always softmax.
    """
    _check_count(num_layers, k)
    return [_round_half_up(Fraction((i + 1) * num_layers, k)) - 1 for i in range(k)]


def random_layers(num_layers: int, k: int, seed: int) -> list[int]:
    """K distinct layers drawn uniformly with numpy's default Generator; the same seed gives the same set."""
    _check_count(num_layers, k)
    rng = np.random.default_rng(seed)
    return sorted(int(layer) for layer in rng.choice(num_layers, size=k, replace=False))


def rank_average(*rankings: Sequence[int]) -> list[int]:
    """Merge orderings (each lists the same layers, best first) by mean position; ties to the lower index.

    Used for AVG-S1/AVG-S2: rank_average(ranking_from_importance(ga), ranking_from_importance(gr)).
    """
    if not rankings:
        raise ValueError("rank_average needs at least one ranking")
    layers = set(rankings[0])
    for number, ranking in enumerate(rankings):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranking {number} lists a layer more than once: {list(ranking)}")
        if set(ranking) != layers:
            raise ValueError(f"ranking {number} does not rank the same layers as ranking 0")
    position_sum = {layer: 0 for layer in layers}
    for ranking in rankings:
        for position, layer in enumerate(ranking):
            position_sum[layer] += position
    # Equal sums mean equal averages, so integer sums keep the comparison exact.
    return sorted(layers, key=lambda layer: (position_sum[layer], layer))


def validate_layer_list(layers: Sequence[int], num_layers: int, name: str) -> list[int]:
    """Raise one ValueError naming the list and the bad index; return the layers sorted ascending."""
    seen: set[int] = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"{name}: layer index {layer!r} is not an integer")
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"{name}: layer index {layer} is out of range for a model with {num_layers} layers "
                f"(valid 0..{num_layers - 1})"
            )
        if layer in seen:
            raise ValueError(f"{name}: layer index {layer} appears more than once")
        seen.add(int(layer))
    return sorted(seen)
