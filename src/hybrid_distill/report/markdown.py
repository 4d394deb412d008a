"""A table as a GitHub-flavoured Markdown pipe table; block titles become italic rows."""
from __future__ import annotations

import re

from hybrid_distill.report.layout import Cell, Column, Table, flat_label, format_number, is_missing, shown_labels

_SPECIALS = re.compile(r"([\\`*_\[\]|<>])")


def escape(text: str) -> str:
    return _SPECIALS.sub(r"\\\1", text)


def _cell(cell: Cell, column: Column) -> str:
    if is_missing(cell.value):
        return "–"
    text = escape(cell.value) if isinstance(cell.value, str) else format_number(cell.value, column.decimals)
    if cell.bold:
        text = f"**{text}**"
    if cell.std is not None and not is_missing(cell.std):
        text += f" ± {format_number(cell.std, column.decimals)}"
    return text


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def to_markdown(table: Table) -> str:
    """Header (teacher and ratio flattened into one label), alignment row, then rows; bold via **."""
    lines = [_line([escape(header) for header in table.row_headers]
                   + [escape(flat_label(column)) for column in table.columns])]
    lines.append(_line([":--"] * len(table.row_headers)
                       + ["--:" if column.numeric else ":--" for column in table.columns]))
    blank = [""] * (len(table.row_headers) + len(table.columns) - 1)
    for block in table.blocks:
        if block.show_title and block.title:
            lines.append(_line([f"*{escape(block.title)}*"] + blank))
        previous = None
        for row in block.rows:
            labels = [escape(label) for label in shown_labels(row.labels, previous)]
            lines.append(_line(labels + [_cell(cell, column) for cell, column in zip(row.cells, table.columns)]))
            previous = row.labels
    return "\n".join(lines) + "\n"
