"""Score tables in the paper's layout (selectors x softmax ratio), the per-model summary and the chosen layers.

Columns are grouped by (teacher, mixer): one group per teacher as in the paper's Table 4, split by mixer when
the run trained its hybrids with more than one (e.g. GDN-selected layers also trained as GLA).
"""
from __future__ import annotations

import logging
import math

import pandas as pd

from hybrid_distill.report.layout import Block, Cell, Column, Row, Table, mark_best
from hybrid_distill.report.naming import (
    RECALL_MEAN, REFERENCE_GROUP, REFERENCE_KINDS, display_name, group_order, is_recall_task, lower_is_better,
    mixer_name, percent_label, selector_group, selector_sort_key,
)

log = logging.getLogger(__name__)
STAT_KEYS = ["teacher", "mixer", "ratio", "selector"]


def with_recall_mean(evals: pd.DataFrame) -> pd.DataFrame:
    """Add a `recall_mean` score per model: the mean over every recall task its teacher was scored on.

    A model missing one of those tasks gets NaN (and a warning) rather than a mean over fewer tasks.
    """
    recall = evals[evals["score"].map(is_recall_task)]
    if recall.empty:
        return evals
    tasks = recall.groupby("teacher")["score"].agg(frozenset)
    means = []
    for source, model_rows in recall.groupby("source", sort=False):
        first = model_rows.iloc[0]
        missing = tasks[first["teacher"]] - frozenset(model_rows["score"])
        if missing:
            log.warning("%s: lacks recall task(s) %s; its recall mean is left out", source, ", ".join(sorted(missing)))
        value = math.nan if missing else model_rows["value"].mean(skipna=False)
        means.append({**first.to_dict(), "score": RECALL_MEAN, "value": value})
    added = pd.DataFrame(means, columns=evals.columns).astype(evals.dtypes.to_dict())
    return pd.concat([evals, added], ignore_index=True)


def score_names(evals: pd.DataFrame) -> list[str]:
    """Recall mean first, then recall tasks, then held-out scores, each alphabetical."""
    return sorted(set(evals["score"]), key=lambda name: (name != RECALL_MEAN, lower_is_better(name), name))


def column_groups(evals: pd.DataFrame) -> list[tuple[str, str]]:
    """(teacher, mixer) pairs with a student; a teacher evaluated alone still gets its group."""
    students = evals[evals["kind"] != "teacher"]
    groups = set(zip(students["teacher"], students["mixer"]))
    groups |= {(teacher, "") for teacher in set(evals["teacher"]) if teacher not in {t for t, _ in groups}}
    return sorted(groups)


def group_label(evals: pd.DataFrame, group: tuple[str, str]) -> str:
    """'Llama-3.2-3B', 'GLA' or 'Llama-3.2-3B, GLA'; the mixer is named only where the run has several."""
    teacher, mixer = group
    several_mixers = len({m for _, m in column_groups(evals)}) > 1
    return ", ".join(part for part in (teacher, mixer_name(mixer) if several_mixers else "") if part)


def hybrid_stats(evals: pd.DataFrame, score: str) -> pd.DataFrame:
    """Mean, sample std (n - 1) and count of replicated runs (e.g. random seeds) per (group, ratio, selector)."""
    hybrids = evals[(evals["kind"] == "hybrid") & (evals["score"] == score)]
    return hybrids.groupby(STAT_KEYS).agg(
        mean=("value", "mean"), std=("value", "std"), n=("value", "count"), k=("k", "first"))


def group_ratios(stats: pd.DataFrame, group: tuple[str, str]) -> list[float]:
    return sorted({ratio for teacher, mixer, ratio, _ in stats.index if (teacher, mixer) == group})


def reference_value(evals: pd.DataFrame, score: str, group: tuple[str, str], kind: str) -> float | None:
    """The teacher's value (shared by all of its mixer groups) or the group's all-linear value."""
    teacher, mixer = group
    rows = evals[(evals["kind"] == kind) & (evals["score"] == score) & (evals["teacher"] == teacher)]
    if kind != "teacher":
        rows = rows[rows["mixer"] == mixer]
    return None if rows.empty or pd.isna(rows["value"].iloc[0]) else float(rows["value"].iloc[0])


def replicate_label(selector: str, counts) -> str:
    """'Random (2 seeds)' where a selector was run more than once; 'Random (2-3 seeds)' if the count varies."""
    counts = sorted({int(count) for count in counts if count > 0})
    name = display_name(selector)
    if not counts or counts[-1] <= 1:
        return name
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{name} ({seeds} seeds)"


def _stat_cell(stats: pd.DataFrame, key: tuple, bold: bool) -> Cell:
    if key not in stats.index:
        return Cell()
    entry = stats.loc[key]
    std = None if entry["n"] < 2 or pd.isna(entry["std"]) else float(entry["std"])
    return Cell(None if pd.isna(entry["mean"]) else float(entry["mean"]), std, bold)


def _reference_rows(evals: pd.DataFrame, scores_and_groups: list[tuple[str, tuple[str, str]]]) -> list[Row]:
    rows = []
    for kind in REFERENCE_KINDS:
        values = [reference_value(evals, score, group, kind) for score, group in scores_and_groups]
        if any(value is not None for value in values):
            rows.append(Row((display_name(kind),), tuple(Cell(value) for value in values)))
    return rows


def _grouped_blocks(rows_by_selector: dict[str, Row], reference_rows: list[Row]) -> tuple[Block, ...]:
    blocks = [Block(REFERENCE_GROUP, tuple(reference_rows), show_title=False)]
    for group in group_order()[1:]:
        rows = [row for selector, row in rows_by_selector.items() if selector_group(selector) == group]
        blocks.append(Block(group, tuple(rows)))
    return tuple(block for block in blocks if block.rows)


def score_table(evals: pd.DataFrame, score: str, decimals: int = 4) -> Table:
    """Rows: Teacher, All-linear, then selectors by group; columns: softmax ratio per group; best in bold."""
    stats = hybrid_stats(evals, score)
    keys = [(group, ratio) for group in column_groups(evals) for ratio in group_ratios(stats, group)]
    columns = tuple(Column(percent_label(ratio), group=group_label(evals, group), decimals=decimals)
                    for group, ratio in keys)
    selectors = sorted({key[-1] for key in stats.index}, key=selector_sort_key)
    bold = {}
    for group, ratio in keys:
        means = [stats["mean"].get((*group, ratio, selector)) for selector in selectors]
        for selector, is_best in zip(selectors, mark_best(means, lower_is_better(score), decimals)):
            bold[(*group, ratio, selector)] = is_best
    rows = {}
    for selector in selectors:
        counts = stats.xs(selector, level="selector")["n"]
        cells = tuple(_stat_cell(stats, (*group, ratio, selector), bold[(*group, ratio, selector)])
                      for group, ratio in keys)
        rows[selector] = Row((replicate_label(selector, counts),), cells)
    references = _reference_rows(evals, [(score, group) for group, _ in keys])
    return Table(("Selector",), columns, _grouped_blocks(rows, references))


def summary_table(evals: pd.DataFrame, decimals: int = 4) -> Table:
    """Rows: every model (seeds pooled), blocked by softmax ratio; columns: recall mean and held-out scores."""
    scores = [name for name in score_names(evals) if name == RECALL_MEAN or lower_is_better(name)]
    columns = tuple(Column("Recall mean" if name == RECALL_MEAN else name, decimals=decimals) for name in scores)
    stats = {name: hybrid_stats(evals, name) for name in scores}
    index = sorted(set().union(*(frame.index for frame in stats.values())))
    blocks = []
    for group in column_groups(evals):
        label = group_label(evals, group)
        references = _reference_rows(evals, [(name, group) for name in scores])
        if references:
            blocks.append(Block(label or REFERENCE_GROUP, tuple(references), show_title=bool(label)))
        for ratio in sorted({key[2] for key in index if key[:2] == group}):
            selectors = sorted({key[3] for key in index if key[:3] == (*group, ratio)}, key=selector_sort_key)
            bold = {name: mark_best([stats[name]["mean"].get((*group, ratio, s)) for s in selectors],
                                    lower_is_better(name), decimals) for name in scores}
            rows = []
            for position, selector in enumerate(selectors):
                key = (*group, ratio, selector)
                counts = [stats[name]["n"].get(key, 0) for name in scores]
                cells = tuple(_stat_cell(stats[name], key, bold[name][position]) for name in scores)
                rows.append(Row((replicate_label(selector, counts),), cells))
            k = next(stats[name]["k"][key] for name in scores if key in stats[name].index)
            title = f"{percent_label(ratio)} softmax (K={k})"
            blocks.append(Block(f"{label}, {title}" if label else title, tuple(rows)))
    return Table(("Model",), columns, tuple(blocks))


def layers_table(evals: pd.DataFrame) -> Table:
    """Which layers stayed softmax, per selector and ratio (per teacher); replicated runs list each seed's set.

    Mixers share their layer sets (selection transfers), so a set trained with two mixers is listed once.
    """
    models = evals[evals["kind"] == "hybrid"].drop_duplicates("source")
    keys = sorted(set(zip(models["teacher"], models["ratio"])))
    columns = tuple(Column(percent_label(ratio), group=teacher, numeric=False) for teacher, ratio in keys)
    rows = {}
    for selector in sorted(set(models["selector"]), key=selector_sort_key):
        cells = []
        for teacher, ratio in keys:
            runs = models[(models["selector"] == selector) & (models["teacher"] == teacher)
                          & (models["ratio"] == ratio)].sort_values(["seed", "model"])
            runs = runs.drop_duplicates(["seed", "softmax_layers"])
            sets = [", ".join(map(str, layers)) for layers in runs["softmax_layers"]]
            if len(sets) > 1:
                names = [model if pd.isna(seed) else f"s{seed}" for seed, model in zip(runs["seed"], runs["model"])]
                sets = [f"{name}: {layers}" for name, layers in zip(names, sets)]
            cells.append(Cell("; ".join(sets) if sets else None))
        rows[selector] = Row((display_name(selector),), tuple(cells))
    return Table(("Selector",), columns, _grouped_blocks(rows, []))
