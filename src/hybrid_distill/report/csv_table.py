"""A table as CSV: plain numbers at full precision, no markup; block titles go in a group column."""
from __future__ import annotations

import csv
import io

from hybrid_distill.report.layout import Table, flat_label, is_missing


def _plain(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, str):
        return value
    return f"{float(value):.10g}"  # drops float noise such as 0.8500000000000001


def to_csv(table: Table) -> str:
    """Columns: [group], row labels, one per value column, then '<column> std' when any cell has a std."""
    with_group = any(block.title for block in table.blocks)
    header = ([table.group_header] if with_group else []) + list(table.row_headers)
    header += [flat_label(column) for column in table.columns]
    if table.has_std:
        header += [f"{flat_label(column)} std" for column in table.columns if column.numeric]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for block in table.blocks:
        for row in block.rows:
            line = ([block.title] if with_group else []) + list(row.labels)
            line += [_plain(cell.value) for cell in row.cells]
            if table.has_std:
                line += [_plain(cell.std) for cell, column in zip(row.cells, table.columns) if column.numeric]
            writer.writerow(line)
    return buffer.getvalue()

