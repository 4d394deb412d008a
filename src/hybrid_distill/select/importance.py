"""Turn per-layer scores into importance tables and chosen layer sets."""
from __future__ import annotations

import csv
import io

from hybrid_distill.select.greedy import greedy_layers
from hybrid_distill.select.layer_sets import (
    random_layers, rank_average, ranking_from_importance, top_k_layers, uniform_layers, validate_layer_list,
)

# Selectors that need no signal; the rest read an importance mapping (higher = keep softmax).
LAYOUT_SELECTORS = ("uniform", "random", "user")
AVERAGED_SELECTORS = {"avg_s1": ("ga_s1", "gr_s1"), "avg_s2": ("ga_s2", "gr_s2")}


def importance_csv(importance: dict[int, float], heldout_kl: dict[int, float] | None = None) -> str:
    """CSV text with columns layer, importance, heldout_kl, rank (1 = keep softmax first)."""
    ranking = ranking_from_importance(importance)
    rank_of = {layer: position + 1 for position, layer in enumerate(ranking)}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "importance", "heldout_kl", "rank"])
    for layer in sorted(importance):
        kl = "" if heldout_kl is None else f"{heldout_kl[layer]:.6g}"
        writer.writerow([layer, f"{importance[layer]:.6g}", kl, rank_of[layer]])
    return buffer.getvalue()


def choose_layers(selector: str, k: int, num_layers: int, signals: dict[str, dict[int, float]] | None = None,
                  seed: int = 0, user_layers: list[int] | None = None,
                  pick_order: list[int] | None = None) -> list[int]:
    """The K softmax layers a selector picks; `signals` maps signal name -> {layer: importance}, `pick_order`
    lists GA-iter's greedy picks."""
    signals = signals or {}
    if selector == "ga_iter":
        if pick_order is None:
            raise ValueError("selector 'ga_iter' needs its greedy pick order, which is missing")
        return greedy_layers(pick_order, k)
    if selector == "uniform":
        return uniform_layers(num_layers, k)
    if selector == "random":
        return random_layers(num_layers, k, seed)
    if selector == "user":
        layers = validate_layer_list(user_layers or [], num_layers, "selection.user_layers")
        if len(layers) != k:
            raise ValueError(f"selection.user_layers has {len(layers)} layers but K={k} was asked")
        return layers
    if selector in AVERAGED_SELECTORS:
        first, second = (ranking_from_importance(signals[name]) for name in AVERAGED_SELECTORS[selector])
        return sorted(rank_average(first, second)[:k])
    if selector not in signals:
        raise ValueError(f"selector {selector!r} needs its importance signal, which is missing")
    return top_k_layers(signals[selector], k)
