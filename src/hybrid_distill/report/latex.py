"""A table as a booktabs tabular, ready to \\input inside a table environment."""
from __future__ import annotations

import re

from hybrid_distill.report.layout import Cell, Column, Table, format_number, is_missing, shown_labels

_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_SPECIALS_PATTERN = re.compile("|".join(re.escape(char) for char in _SPECIALS))


def escape(text: str) -> str:
    """Escape LaTeX's special characters in one pass (so the backslash of '\\%' is not escaped again)."""
    return _SPECIALS_PATTERN.sub(lambda match: _SPECIALS[match.group(0)], text)


def _cell(cell: Cell, column: Column) -> str:
    if is_missing(cell.value):
        return "--"
    if isinstance(cell.value, str):
        text = escape(cell.value)
    else:
        text = format_number(cell.value, column.decimals)
    if cell.bold:
        text = rf"\textbf{{{text}}}"
    if cell.std is not None and not is_missing(cell.std):
        text += rf" $\pm$ {format_number(cell.std, column.decimals)}"
    return text


def _line(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def _group_header(table: Table) -> list[str]:
    """The spanning row over the value columns (e.g. one teacher per group of ratios) and its cmidrules."""
    spans: list[tuple[str, int, int]] = []  # (group, first column number, last), 1-based over the whole tabular
    first = len(table.row_headers) + 1
    for offset, column in enumerate(table.columns):
        number = first + offset
        if spans and spans[-1][0] == column.group:
            spans[-1] = (column.group, spans[-1][1], number)
        else:
            spans.append((column.group, number, number))
    cells = [""] * len(table.row_headers)
    for group, start, last in spans:
        if group:
            cells.append(rf"\multicolumn{{{last - start + 1}}}{{c}}{{{escape(group)}}}")
        else:
            cells.extend([""] * (last - start + 1))
    rules = " ".join(rf"\cmidrule(lr){{{start}-{last}}}" for group, start, last in spans if group)
    return [_line(cells), rules]


def to_latex(table: Table) -> str:
    """\\toprule, header, \\midrule between blocks, \\bottomrule; bold via \\textbf, missing values as '--'."""
    spec = "l" * len(table.row_headers) + "".join("r" if column.numeric else "l" for column in table.columns)
    width = len(table.row_headers) + len(table.columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(column.group for column in table.columns):
        lines += _group_header(table)
    lines.append(_line([escape(header) for header in table.row_headers]
                       + [escape(column.label) for column in table.columns]))
    for block in table.blocks:
        lines.append(r"\midrule")
        if block.show_title and block.title:
            lines.append(_line([rf"\multicolumn{{{width}}}{{l}}{{\textit{{{escape(block.title)}}}}}"]))
        previous = None
        for row in block.rows:
            labels = [escape(label) for label in shown_labels(row.labels, previous)]
            lines.append(_line(labels + [_cell(cell, column) for cell, column in zip(row.cells, table.columns)]))
            previous = row.labels
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
