"""The chosen softmax layers of a selector at one K, and the GR-S2 signal from removal scores (no torch)."""
from __future__ import annotations

import logging
from pathlib import Path

from hybrid_distill.distill.atomic import write_json
from hybrid_distill.select.importance import choose_layers
from hybrid_distill.select.score_files import read_importance_csv, read_score, signals_from_json, signals_to_json

log = logging.getLogger(__name__)


def select_layers(selector: str, k: int, total_layers: int, out_json: Path, seed: int = 0,
                  signal_files: list[Path] = (), importance_file: Path | None = None,
                  pick_order: list[int] | None = None, user_layers: list[int] = ()) -> list[int]:
    """Write the chosen softmax layers of one selector at one K (`pick_order`: GA-iter's greedy picks)."""
    signals: dict[str, dict[int, float]] = {}
    for path in signal_files:
        signals.update(signals_from_json(path))
    if importance_file is not None:
        signals["ga_s2"] = read_importance_csv(importance_file)
    layers = choose_layers(selector, k, total_layers, signals, seed=seed,
                           user_layers=list(user_layers), pick_order=pick_order)
    payload = {"selector": selector, "k": k, "seed": seed, "softmax_layers": layers,
               "importance": signals.get(selector)}
    if pick_order is not None:
        payload["pick_order"] = list(pick_order[:k])
    write_json(out_json, payload)
    log.info("%s at K=%d%s: softmax layers %s", selector, k, f" (seed {seed})" if selector == "random" else "", layers)
    return layers


def removal_signal(score_files: list[Path], out_json: Path) -> None:
    """GR-S2: importance of layer l = held-out KL after linearising l alone and a brief stage 2."""
    kl = {i: read_score(path)["heldout_kl"] for i, path in enumerate(score_files)}
    write_json(out_json, signals_to_json({"gr_s2": kl}))
