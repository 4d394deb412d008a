"""Stability rule for stopping the selection pass early (paper Appendix B).

Snapshots of the selected top-K set are taken every few stage-2 steps; selection stops at the first
snapshot whose window of the last R sets agrees closely (mean pairwise Jaccard), shares a backbone of
at least K - 1 layers and touches at most K + 1 layers in all.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from fractions import Fraction
from itertools import combinations


def _jaccard_exact(a: Collection[int], b: Collection[int]) -> Fraction:
    a, b = set(a), set(b)
    union = a | b
    if not union:
        return Fraction(1)
    return Fraction(len(a & b), len(union))


def _mean_pairwise_exact(sets: Sequence[Collection[int]]) -> Fraction:
    if not sets:
        raise ValueError("mean_pairwise_jaccard needs at least one set")
    pairs = list(combinations(sets, 2))
    if not pairs:
        return Fraction(1)
    return sum((_jaccard_exact(a, b) for a, b in pairs), Fraction(0)) / len(pairs)


def jaccard(a: Collection[int], b: Collection[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets count as identical (1.0)."""
    return float(_jaccard_exact(a, b))


def mean_pairwise_jaccard(sets: Sequence[Collection[int]]) -> float:
    """Mean Jaccard over all unordered pairs; a single set is trivially stable (1.0)."""
    return float(_mean_pairwise_exact(sets))


def resolved_limits(k: int, min_backbone: int | None, max_union: int | None) -> tuple[int, int]:
    """The backbone and union limits the rule applies: K - 1 and K + 1 where the config leaves them null."""
    return (k - 1 if min_backbone is None else min_backbone, k + 1 if max_union is None else max_union)


def early_stop_decision(
    snapshot_sets: Sequence[Collection[int]],
    k: int,
    window: int = 10,
    min_mean_jaccard: float = 0.90,
    min_backbone: int | None = None,
    max_union: int | None = None,
) -> dict:
    """Apply the rule to every snapshot; `snapshot` is the index where it first fires, else None.

    Series entries are None until a full window exists. Jaccard is compared as an exact fraction
    against the threshold as written (0.9 means 9/10), so a window at exactly the threshold fires.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"early stop: k must be a positive integer, got {k!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"early stop: window must be a positive integer, got {window!r}")
    if not 0 <= min_mean_jaccard <= 1:
        raise ValueError(f"early stop: min_mean_jaccard must be in [0, 1], got {min_mean_jaccard!r}")
    min_backbone, max_union = resolved_limits(k, min_backbone, max_union)
    threshold = Fraction(str(min_mean_jaccard))

    mean_series: list[float | None] = []
    backbone_series: list[int | None] = []
    union_series: list[int | None] = []
    fired_at = None
    for index in range(len(snapshot_sets)):
        if index + 1 < window:
            mean_series.append(None)
            backbone_series.append(None)
            union_series.append(None)
            continue
        recent = [set(layers) for layers in snapshot_sets[index + 1 - window : index + 1]]
        mean_exact = _mean_pairwise_exact(recent)
        backbone = len(set.intersection(*recent))
        union = len(set.union(*recent))
        mean_series.append(float(mean_exact))
        backbone_series.append(backbone)
        union_series.append(union)
        if fired_at is None and mean_exact >= threshold and backbone >= min_backbone and union <= max_union:
            fired_at = index
    return {
        "stop": fired_at is not None,
        "snapshot": fired_at,
        "mean_jaccard": mean_series,
        "backbone": backbone_series,
        "union": union_series,
    }
