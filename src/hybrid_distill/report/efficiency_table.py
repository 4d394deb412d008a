"""Inference cost per model and context length: decode throughput, prefill latency, cache and peak memory."""
from __future__ import annotations

import pandas as pd

from hybrid_distill.report.layout import Block, Cell, Column, Row, Table
from hybrid_distill.report.naming import mixer_name, model_label, selector_of_model, selector_sort_key

MIB = 2**20
# (header group, measurement column, scale to the shown unit, decimals)
METRICS = (
    ("Decode tok/s", "decode_tok_s", 1.0, 1),
    ("Prefill ms", "prefill_s", 1000.0, 2),
    ("Cache MiB", "cache_bytes", 1 / MIB, 1),
    ("Peak MiB", "peak_mem_bytes", 1 / MIB, 1),
)


def with_labels(efficiency: pd.DataFrame) -> pd.DataFrame:
    """Add `label` ('GA-S2 K=4', 'All-linear, GLA') and `order`: Teacher, then per mixer All-linear and hybrids."""
    frame = efficiency.copy()
    several_mixers = frame.loc[frame["kind"] != "teacher", "mixer"].nunique() > 1
    labels, orders = [], []
    for model, kind, mixer, selector, k in zip(frame["model"], frame["kind"], frame["mixer"], frame["selector"],
                                               frame["k"]):
        k = None if pd.isna(k) else int(k)
        label = model_label(model, kind, k, selector if kind == "hybrid" and selector else None)
        labels.append(f"{label}, {mixer_name(mixer)}" if several_mixers and mixer else label)
        hybrid_selector = (selector or selector_of_model(model) or model) if kind == "hybrid" else kind
        orders.append((kind != "teacher", mixer, kind == "hybrid", -1 if k is None else k,
                       selector_sort_key(hybrid_selector), model))
    frame["label"], frame["order"] = labels, orders
    return frame


def by_model(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """The rows of each measured model, in table order."""
    return sorted((rows for _, rows in frame.groupby(["mixer", "model"])), key=lambda rows: rows["order"].iloc[0])


def efficiency_table(efficiency: pd.DataFrame) -> Table:
    """Rows: model x context; columns: each measurement at each batch size. Measurements never taken are dropped."""
    frame = with_labels(efficiency)
    batches = sorted(set(frame["batch"]))
    metrics = [metric for metric in METRICS if frame[metric[1]].notna().any()]
    columns = tuple(Column(f"B={batch}", group=group, decimals=decimals)
                    for group, _, _, decimals in metrics for batch in batches)
    blocks = []
    for model_rows in by_model(frame):
        indexed = model_rows.set_index(["context", "batch"])
        rows = []
        for context in sorted(set(model_rows["context"])):
            cells = []
            for _, measurement, scale, _ in metrics:
                for batch in batches:
                    value = indexed[measurement].get((context, batch))
                    cells.append(Cell(None if value is None or pd.isna(value) else float(value) * scale))
            rows.append(Row((model_rows["label"].iloc[0], str(context)), tuple(cells)))
        blocks.append(Block("", tuple(rows), show_title=False))
    return Table(("Model", "Context"), columns, tuple(blocks))
