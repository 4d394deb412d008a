"""Bench results side by side (`scripts/compare_benches.py`): whether a change paid, and which kernels moved.

The first file is the baseline. Rows are matched by stage, student and step; each shows its tokens/s against the
baseline's, and where both were profiled (`--profile-top`), the kinds of kernel and the kernels whose time moved.
Pure functions on the bench's JSON, so a lease's results can be read on any machine.
"""
from __future__ import annotations

import json
from pathlib import Path

ROW_KEY = ("stage", "student", "step")


def load_result(path: Path) -> dict:
    """One `hybrid-distill bench --out` file; anything else stops with the file named."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable bench result ({error})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or "tokens_per_step" not in result:
        raise ValueError(f"{path}: not a bench result (no 'rows' and 'tokens_per_step')")
    return result


def step_ms(result: dict, row: dict) -> float | None:
    return result["tokens_per_step"] / row["tokens_per_s"] * 1e3 if row.get("tokens_per_s") else None


def differing_options(results: list[dict]) -> dict[str, list]:
    """The options (and device, shape, tokens per step) whose values are not the same in every file."""
    def settings(result):
        return {**result.get("options", {}), "device": result.get("device"), "shape": result.get("shape"),
                "tokens_per_step": result.get("tokens_per_step")}

    every = [settings(result) for result in results]
    keys = sorted(set().union(*every))
    return {key: [each.get(key) for each in every] for key in keys
            if len({json.dumps(each.get(key), sort_keys=True) for each in every}) > 1}


def _rows_by_key(result: dict) -> dict[tuple, dict]:
    return {tuple(row[key] for key in ROW_KEY): row for row in result["rows"]}


def row_table(results: list[dict]) -> list[dict]:
    """One entry per row of any file, in the baseline's order first: each file's numbers, None where it lacks it."""
    keys = []
    for result in results:
        keys += [key for key in _rows_by_key(result) if key not in keys]
    table = []
    for key in keys:
        cells = []
        for result in results:
            row = _rows_by_key(result).get(key)
            cells.append(None if row is None else {"tokens_per_s": row.get("tokens_per_s"), "mfu": row.get("mfu"),
                                                   "mfu_with_attention": row.get("mfu_with_attention"),
                                                   "peak_mem_gb": row.get("peak_mem_gb"),
                                                   "step_ms": step_ms(result, row), "note": row.get("note", "")})
        base = cells[0]["tokens_per_s"] if cells[0] else None
        for cell in cells:
            if cell:
                cell["change"] = cell["tokens_per_s"] / base - 1 if base and cell["tokens_per_s"] else None
        table.append({"key": key, "cells": cells})
    return table


def kernel_changes(base_row: dict, other_row: dict, min_ms: float) -> list[dict]:
    """Kernels whose time per step moved by at least `min_ms`, largest move first. A kernel missing from one
    list ran below that profile's cut-off or not at all (its ms is None there)."""
    base = {kernel["name"]: kernel for kernel in base_row.get("top_kernels") or []}
    other = {kernel["name"]: kernel for kernel in other_row.get("top_kernels") or []}
    changes = []
    for name in base.keys() | other.keys():
        before, after = base.get(name), other.get(name)
        moved = (after["ms"] if after else 0.0) - (before["ms"] if before else 0.0)
        if abs(moved) >= min_ms:
            changes.append({"name": name, "base_ms": before and before["ms"], "ms": after and after["ms"],
                            "base_calls": before and before["calls"], "calls": after and after["calls"],
                            "moved_ms": moved})
    return sorted(changes, key=lambda change: -abs(change["moved_ms"]))


def group_changes(base_row: dict, other_row: dict) -> list[tuple[str, float, float]]:
    """(kind of kernel, baseline ms, ms) for every kind either profile has."""
    base = {group["group"]: group["ms"] for group in base_row.get("kernel_groups") or []}
    other = {group["group"]: group["ms"] for group in other_row.get("kernel_groups") or []}
    return [(name, base.get(name, 0.0), other.get(name, 0.0)) for name in [*base, *(k for k in other if k not in base)]]


def _number(value, form: str, width: int) -> str:
    return f"{value:{width}{form}}" if value is not None else f"{'-':>{width}}"


def format_comparison(results: list[dict], names: list[str], min_kernel_ms: float = 0.2) -> str:
    lines = [f"baseline: {names[0]}"]
    rates = [result.get("matmul_bf16_flops") for result in results]
    if any(rates):  # differing rates on one card model mean different machines
        lines.append("  measured bf16 matmul TFLOP/s: " + ", ".join(
            f"{name} {rate / 1e12:.0f}" if rate else f"{name} -" for name, rate in zip(names, rates)))
    for key, values in differing_options(results).items():
        lines.append(f"  {key}: " + ", ".join(f"{name} {value if value is not None else '-'}"
                                               for name, value in zip(names, values)))
    width = max(len(name) for name in names)
    for entry in row_table(results):
        lines.append(f"{' / '.join(entry['key'])}:")
        lines.append(f"  {'file':{width}} {'tok/s':>10} {'change':>8} {'step ms':>8} {'MFU':>6} {'MFU+attn':>8} "
                     f"{'peak GB':>8}  note")
        for name, cell in zip(names, entry["cells"]):
            if cell is None:
                lines.append(f"  {name:{width}} {'(no such row)':>10}")
                continue
            change = f"{cell['change'] * 100:+7.2f}%" if cell.get("change") is not None else f"{'-':>8}"
            mfu = f"{cell['mfu'] * 100:5.1f}%" if cell["mfu"] else f"{'-':>6}"
            with_attention = (f"{cell['mfu_with_attention'] * 100:7.1f}%" if cell.get("mfu_with_attention")
                              else f"{'-':>8}")
            lines.append(f"  {name:{width}} {_number(cell['tokens_per_s'], ',.0f', 10)} {change} "
                         f"{_number(cell['step_ms'], '.1f', 8)} {mfu} {with_attention} "
                         f"{_number(cell['peak_mem_gb'], '.1f', 8)}  {cell['note']}")
        base_row = _rows_by_key(results[0]).get(entry["key"])
        for name, result in zip(names[1:], results[1:]):
            row = _rows_by_key(result).get(entry["key"])
            if not (base_row and row and base_row.get("kernel_groups") and row.get("kernel_groups")):
                continue
            lines.append(f"  device ms by kind of kernel, {names[0]} -> {name}:")
            lines += [f"    {before:8.2f} -> {after:8.2f} ({after - before:+6.2f})  {group}"
                      for group, before, after in group_changes(base_row, row)]
            changes = kernel_changes(base_row, row, min_kernel_ms)
            lines.append(f"  kernels that moved by {min_kernel_ms} ms or more ({names[0]} -> {name}; - = not listed):")
            lines += [f"    {_number(change['base_ms'], '.2f', 8)} -> {_number(change['ms'], '.2f', 8)} "
                      f"({change['moved_ms']:+6.2f}) x{change['base_calls'] or '-'} -> x{change['calls'] or '-'}  "
                      f"{change['name']}" for change in changes] or ["    none"]
    return "\n".join(lines)
