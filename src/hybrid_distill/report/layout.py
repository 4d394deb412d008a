"""A table as the three writers (CSV, LaTeX, Markdown) see it: blocks of labelled rows of cells."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    label: str
    group: str = ""       # spanning header above the label (e.g. the teacher); "" for none
    decimals: int = 4
    numeric: bool = True


@dataclass(frozen=True)
class Cell:
    value: float | str | None = None
    std: float | None = None  # shown as "± std" where given (replicated runs)
    bold: bool = False


@dataclass(frozen=True)
class Row:
    labels: tuple[str, ...]
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Block:
    """Rows set apart by rules; `title` heads the block where `show_title`, and fills CSV's group column."""
    title: str
    rows: tuple[Row, ...]
    show_title: bool = True


@dataclass(frozen=True)
class Table:
    row_headers: tuple[str, ...]
    columns: tuple[Column, ...]
    blocks: tuple[Block, ...]
    group_header: str = "Group"

    def __post_init__(self):
        for block in self.blocks:
            for row in block.rows:
                if len(row.labels) != len(self.row_headers) or len(row.cells) != len(self.columns):
                    raise ValueError(f"row {row.labels} does not fit the table's {len(self.row_headers)} "
                                     f"label and {len(self.columns)} value columns")

    @property
    def has_std(self) -> bool:
        return any(cell.std is not None for block in self.blocks for row in block.rows for cell in row.cells)


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value: float, decimals: int) -> str:
    """Fixed decimals; negative zero is printed as zero."""
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def mark_best(values: Sequence[float | None], lower_is_better: bool, decimals: int) -> list[bool]:
    """Which values are best, judged on the printed (rounded) numbers, so that visible ties are all bold."""
    shown = [None if is_missing(value) else float(format_number(float(value), decimals)) for value in values]
    present = [value for value in shown if value is not None]
    if not present:
        return [False] * len(values)
    best = min(present) if lower_is_better else max(present)
    return [value is not None and value == best for value in shown]


def flat_label(column: Column) -> str:
    return f"{column.group} {column.label}" if column.group else column.label


def shown_labels(labels: tuple[str, ...], previous: tuple[str, ...] | None) -> list[str]:
    """Leading labels equal to the previous row's are left blank, so a model name heads its context rows."""
    return ["" if previous is not None and index < len(labels) - 1 and labels[: index + 1] == previous[: index + 1]
            else label for index, label in enumerate(labels)]
