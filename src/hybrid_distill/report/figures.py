"""Report figures, drawn on Agg canvases (no pyplot state, no display) and saved as PNG and PDF."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from hybrid_distill.report.efficiency_table import MIB, by_model, with_labels
from hybrid_distill.report.files import write_bytes_atomic
from hybrid_distill.report.naming import (
    REFERENCE_KINDS, display_name, percent_label, score_title, selector_group, selector_sort_key,
)
from hybrid_distill.report.tables import column_groups, group_label, hybrid_stats, reference_value, replicate_label

FORMATS = ("png", "pdf")
REFERENCE_STYLE = {"teacher": dict(color="black"), "all_linear": dict(color="0.5")}


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, **subplot_args):
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, **subplot_args)
    return figure, axes.ravel()


def save_figure(figure: Figure, stem: Path) -> list[Path]:
    """`stem`.png and `stem`.pdf, each written atomically; the PDF carries no creation date (reproducible)."""
    written = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        metadata = {"CreationDate": None} if fmt == "pdf" else {}
        figure.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
        written.append(write_bytes_atomic(stem.with_name(f"{stem.name}.{fmt}"), buffer.getvalue()))
    return written


def plot_score_vs_ratio(evals: pd.DataFrame, score: str, stem: Path) -> list[Path]:
    """One line per selector (error bars where seeds were pooled); Teacher and All-linear as dashed lines."""
    stats = hybrid_stats(evals, score).reset_index()
    groups = column_groups(evals)
    figure, axes = new_figure(7.4 * len(groups), 4.2, 1, len(groups))
    for axis, group in zip(axes, groups):
        own = stats[(stats["teacher"] == group[0]) & (stats["mixer"] == group[1])]
        for index, selector in enumerate(sorted(set(own["selector"]), key=selector_sort_key)):
            line = own[own["selector"] == selector].sort_values("ratio")
            learning = selector_group(selector) == "Learning-based"
            axis.errorbar(100 * line["ratio"], line["mean"], yerr=line["std"].where(line["n"] > 1),
                          label=replicate_label(selector, line["n"]), marker="os^vD<>ph*"[index % 10],
                          linestyle="-" if learning else "-.", capsize=3,
                          linewidth=2.4 if selector == "ga_s2" else 1.4, color=f"C{index % 10}")
        for kind in REFERENCE_KINDS:
            value = reference_value(evals, score, group, kind)
            if value is not None:
                axis.axhline(value, linestyle="--", linewidth=1.2, label=display_name(kind), **REFERENCE_STYLE[kind])
        ratios = sorted(set(own["ratio"]))
        axis.set_xticks([100 * ratio for ratio in ratios], [percent_label(ratio) for ratio in ratios])
        axis.set_xlabel("softmax layers (share of all layers)")
        axis.set_ylabel(score_title(score) + (" (lower is better)" if score.startswith("heldout_") else ""))
        axis.set_title(group_label(evals, group) or score_title(score))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(figure, stem)


def plot_importance(importance: pd.DataFrame, chosen_layers: Sequence[int], k: int | None, stem: Path) -> list[Path]:
    """Per-layer importance (−held-out KL) as bars; the layers GA-S2 kept as softmax at this K are highlighted."""
    chosen = set(chosen_layers)
    figure, (axis,) = new_figure(max(6.0, 0.3 * len(importance) + 2), 3.8)
    colors = ["C3" if layer in chosen else "0.7" for layer in importance["layer"]]
    axis.bar(importance["layer"], importance["importance"], color=colors, edgecolor="black", linewidth=0.5)
    if chosen:
        handles = [Patch(facecolor="C3", edgecolor="black", label=f"softmax (GA-S2, K={k})"),
                   Patch(facecolor="0.7", edgecolor="black", label="linear")]
        axis.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
                    frameon=False)
    axis.set_xticks(list(importance["layer"]))
    axis.set_xlabel("layer")
    axis.set_ylabel("importance (−held-out KL)")
    axis.set_title(f"Layer importance, GA-S2 at K={k}" if chosen else "Layer importance")
    axis.axhline(0, color="black", linewidth=0.6)
    return save_figure(figure, stem)


def plot_early_stop(early_stop: dict, stem: Path) -> list[Path]:
    """Mean Jaccard, backbone and union over the selection pass, thresholds dashed, the firing step marked."""
    rounds: pd.DataFrame = early_stop["rounds"]
    thresholds = early_stop["thresholds"]
    panels = (("mean_jaccard", "mean pairwise Jaccard", thresholds["min_mean_jaccard"], "≥"),
              ("backbone", "backbone |∩ window|", thresholds["min_backbone"], "≥"),
              ("union", "union |∪ window|", thresholds["max_union"], "≤"))
    figure, axes = new_figure(6.4, 7.0, 3, 1, sharex=True)
    fired = early_stop["fired"]
    for axis, (column, label, threshold, relation) in zip(axes, panels):
        axis.plot(rounds["step"], rounds[column], marker="o", color="C0")
        axis.axhline(threshold, linestyle="--", color="C3", label=f"threshold {relation} {threshold:g}")
        if fired:
            axis.axvline(early_stop["fired_step"], linestyle=":", color="black")
            hit = rounds[rounds["round"] == early_stop["fired_round"]]
            axis.plot(hit["step"], hit[column], marker="*", markersize=14, color="C3", linestyle="none",
                      label=f"fired: round {early_stop['fired_round']}, step {early_stop['fired_step']}")
        if column != "mean_jaccard":
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="best")
    if not rounds.empty:  # the first window-1 snapshots have no statistics but belong on the axis
        first, last = rounds["step"].min(), rounds["step"].max()
        pad = max(1.0, 0.03 * (last - first))
        axes[-1].set_xlim(first - pad, last + pad)
    axes[-1].set_xlabel("stage-2 step")
    spent, budget = early_stop["tokens_spent"], early_stop["tokens_full_budget"]
    figure.suptitle(f"Early stop (K={early_stop['k']}, window {early_stop['window']}): "
                    f"{spent:,.0f} of {budget:,.0f} selection tokens")
    return save_figure(figure, stem)


def plot_efficiency(efficiency: pd.DataFrame, batch: int, stem: Path) -> list[Path]:
    """Decode throughput and cache memory against context length (log x), one line per model."""
    frame = with_labels(efficiency)
    frame = frame[frame["batch"] == batch].sort_values(["order", "context"])
    figure, axes = new_figure(10.0, 3.8, 1, 2)
    panels = ((axes[0], "decode_tok_s", 1.0, "decode tokens/s"), (axes[1], "cache_bytes", 1 / MIB, "cache MiB"))
    for axis, column, scale, label in panels:
        for index, rows in enumerate(by_model(frame)):
            reference = rows["kind"].iloc[0] in REFERENCE_KINDS
            axis.plot(rows["context"], rows[column] * scale, marker="o", label=rows["label"].iloc[0],
                      linestyle="--" if reference else "-", color=f"C{index % 10}")
        contexts = sorted(set(frame["context"]))
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(context) for context in contexts])
        axis.minorticks_off()
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="best")
    figure.suptitle(f"Inference cost at batch {batch}")
    return save_figure(figure, stem)
