"""Read and check the workflow's output files; every problem a user can cause names the file it is in."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from hybrid_distill.report.naming import KINDS, REFERENCE_KINDS, seed_from_model

log = logging.getLogger(__name__)

EVALUATION_COLUMNS = ["source", "teacher", "mixer", "model", "kind", "selector", "seed", "k", "ratio",
                      "softmax_layers", "score", "value"]
MEASUREMENTS = ("prefill_s", "decode_tok_s", "cache_bytes", "peak_mem_bytes")
IMPORTANCE_COLUMNS = ("layer", "importance", "heldout_kl", "rank")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict, key: str, path: Path, check, expected: str, where: str = ""):
    if key not in data:
        raise ValueError(f"{path}: {where}missing key '{key}'")
    if not check(data[key]):
        raise ValueError(f"{path}: {where}'{key}' must be {expected}, got {data[key]!r}")
    return data[key]


def _layer_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(layer) and layer >= 0 for layer in value)


def _optional_int(value) -> bool:
    return value is None or _is_int(value)


def _optional_text(data: dict, key: str, path: Path) -> str:
    """An optional string field; null or absent reads as ''."""
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: '{key}' must be a string or null, got {value!r}")
    return value or ""


def _check_evaluation(data: dict, path: Path) -> dict:
    model = _get(data, "model", path, lambda v: isinstance(v, str) and v, "a non-empty string")
    kind = _get(data, "kind", path, lambda v: v in KINDS, f"one of {', '.join(KINDS)}")
    teacher, mixer = _optional_text(data, "teacher", path), _optional_text(data, "mixer", path)
    num_layers = data.get("num_layers")
    if num_layers is not None and not (_is_int(num_layers) and num_layers >= 1):
        raise ValueError(f"{path}: 'num_layers' must be a positive integer or null, got {num_layers!r}")
    if kind == "hybrid":
        selector = _get(data, "selector", path, lambda v: isinstance(v, str) and v, "a non-empty string")
        k = _get(data, "k", path, lambda v: _is_int(v) and v >= 1, "a positive integer")
        ratio = _get(data, "ratio", path, lambda v: v is None or (_is_number(v) and 0 < v <= 1),
                     "null or a number in (0, 1]")
    else:
        selector, k, ratio = kind, None, None
    layers = _get(data, "softmax_layers", path, _layer_list, "a list of layer indices")
    scores = _get(data, "scores", path, lambda v: isinstance(v, dict) and v, "a non-empty object")
    values = {}
    for name, value in scores.items():
        if value is not None and not _is_number(value):
            raise ValueError(f"{path}: scores['{name}'] must be a number or null, got {value!r}")
        if value is None or not math.isfinite(value):
            log.warning("%s: scores['%s'] is %r; shown as missing", path, name, value)
            value = math.nan
        values[name] = float(value)
    seed = seed_from_model(model, selector) if kind == "hybrid" else None
    return dict(source=str(path), teacher=teacher, mixer="" if kind == "teacher" else mixer, model=model, kind=kind,
                selector=selector, seed=seed, k=k, ratio=ratio, softmax_layers=tuple(sorted(layers)),
                num_layers=num_layers, scores=values)


def _resolve_ratios(records: list[dict], num_layers: int | None) -> None:
    """A null ratio becomes K / L; L is the file's num_layers, else the teacher's layer count, else `num_layers`."""
    teacher_layers = {r["teacher"]: len(r["softmax_layers"]) for r in records if r["kind"] == "teacher"}
    for record in records:
        if record["kind"] != "hybrid" or record["ratio"] is not None:
            continue
        layers = record["num_layers"] or teacher_layers.get(record["teacher"]) or num_layers
        if not layers:
            raise ValueError(f"{record['source']}: 'ratio' is null and the layer count is unknown "
                             "(no teacher evaluation with softmax_layers and no importance.csv)")
        record["ratio"] = record["k"] / layers
    for record in records:
        if record["ratio"] is not None:
            record["ratio"] = round(float(record["ratio"]), 6)  # 1/3 from two files lands in one column


def _check_unique(records: list[dict]) -> None:
    """One model name per (teacher, mixer); one teacher per teacher label; one all-linear per (teacher, mixer)."""
    seen: dict[tuple, str] = {}
    for record in records:
        keys = [("model", record["teacher"], record["mixer"], record["model"])]
        if record["kind"] in REFERENCE_KINDS:
            keys.append(("kind", record["teacher"], record["mixer"], record["kind"]))
        for key in keys:
            if key in seen:
                where = ", ".join(f"{name} '{value}'" for name, value in zip(("teacher", "mixer"), key[1:3]) if value)
                raise ValueError(f"{record['source']}: {key[0]} '{key[3]}'{' (' + where + ')' if where else ''} "
                                 f"is also evaluated in {seen[key]}")
            seen[key] = record["source"]
    by_cell: dict[tuple, tuple[int, str]] = {}
    for record in records:
        if record["kind"] != "hybrid":
            continue
        cell = (record["teacher"], record["mixer"], record["ratio"], record["selector"])
        if cell in by_cell and by_cell[cell][0] != record["k"]:
            raise ValueError(f"{record['source']}: {record['selector']} has K={record['k']} at ratio "
                             f"{record['ratio']}, but K={by_cell[cell][0]} in {by_cell[cell][1]}")
        by_cell.setdefault(cell, (record["k"], record["source"]))


def load_evaluations(paths: Sequence[Path], num_layers: int | None = None) -> pd.DataFrame:
    """One row per (model, score), with the softmax ratio resolved and replicates (seeds) kept apart."""
    if not paths:
        raise ValueError("no evaluation JSONs given: the report needs at least one")
    records = [_check_evaluation(read_json_object(Path(path)), Path(path)) for path in paths]
    _resolve_ratios(records, num_layers)
    _check_unique(records)
    rows = [{**{key: record[key] for key in EVALUATION_COLUMNS[:-2]}, "score": name, "value": value}
            for record in records for name, value in record["scores"].items()]
    frame = pd.DataFrame(rows, columns=EVALUATION_COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame["ratio"] = frame["ratio"].astype(float)
    return frame


# how a row's decode tokens/s were timed (evaluate/efficiency.py); files written before the key existed have none
DECODE_LOOPS = ("cuda_graph", "eager")


def _check_efficiency(data: dict, path: Path) -> list[dict]:
    model = _get(data, "model", path, lambda v: isinstance(v, str) and v, "a non-empty string")
    kind = _get(data, "kind", path, lambda v: v in KINDS, f"one of {', '.join(KINDS)}")
    k = _get(data, "k", path, _optional_int, "null or an integer") if "k" in data else None
    mixer = "" if kind == "teacher" else _optional_text(data, "mixer", path)
    selector = _optional_text(data, "selector", path) if kind == "hybrid" else kind
    rows = _get(data, "rows", path, lambda v: isinstance(v, list) and v, "a non-empty list")
    records, seen = [], set()
    for index, row in enumerate(rows):
        where = f"rows[{index}]: "
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where}expected an object, got {row!r}")
        context = _get(row, "context", path, lambda v: _is_int(v) and v > 0, "a positive integer", where)
        batch = _get(row, "batch", path, lambda v: _is_int(v) and v > 0, "a positive integer", where)
        if (context, batch) in seen:
            raise ValueError(f"{path}: {where}context {context}, batch {batch} appears twice")
        seen.add((context, batch))
        values = {key: _get(row, key, path, lambda v: v is None or _is_number(v), "null or a number", where)
                  for key in MEASUREMENTS}
        decode = _get(row, "decode", path, lambda v: v in DECODE_LOOPS, f"one of {', '.join(DECODE_LOOPS)}",
                      where) if "decode" in row else ""
        records.append(dict(source=str(path), model=model, kind=kind, mixer=mixer, selector=selector, k=k,
                            context=context, batch=batch, decode=decode,
                            **{key: math.nan if value is None else float(value) for key, value in values.items()}))
    return records


def load_efficiency(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per (mixer, model, context, batch); null measurements (e.g. out of memory) become NaN."""
    records, owner = [], {}
    for path in paths:
        file_records = _check_efficiency(read_json_object(Path(path)), Path(path))
        key = (file_records[0]["mixer"], file_records[0]["model"])
        if key in owner:
            raise ValueError(f"{path}: model '{key[1]}' is also measured in {owner[key]}")
        owner[key] = str(path)
        records.extend(file_records)
    columns = ["source", "model", "kind", "mixer", "selector", "k", "context", "batch", "decode", *MEASUREMENTS]
    frame = pd.DataFrame(records, columns=columns)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def load_importance(path: Path) -> pd.DataFrame:
    """Per-layer importance, sorted by layer."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: cannot be read as CSV ({error})") from error
    missing = [column for column in IMPORTANCE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(IMPORTANCE_COLUMNS)})")
    if frame.empty:
        raise ValueError(f"{path}: has no rows")
    for column in ("layer", "importance", "rank"):
        if not pd.api.types.is_numeric_dtype(frame[column]) or frame[column].isna().any():
            raise ValueError(f"{path}: column '{column}' must hold a number in every row")
    if not pd.api.types.is_numeric_dtype(frame["heldout_kl"]):  # may be empty when not recorded
        raise ValueError(f"{path}: column 'heldout_kl' must hold numbers (or be empty)")
    if not pd.api.types.is_integer_dtype(frame["layer"]) or frame["layer"].duplicated().any():
        raise ValueError(f"{path}: column 'layer' must hold distinct integers")
    return frame.sort_values("layer").reset_index(drop=True)


def load_selections(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per (selector, K, seed) layer set."""
    records, owner = [], {}
    for path in map(Path, paths):
        data = read_json_object(path)
        selector = _get(data, "selector", path, lambda v: isinstance(v, str) and v, "a non-empty string")
        k = _get(data, "k", path, lambda v: _is_int(v) and v >= 1, "a positive integer")
        layers = _get(data, "softmax_layers", path, _layer_list, "a list of layer indices")
        if len(set(layers)) != k:
            raise ValueError(f"{path}: 'softmax_layers' has {len(set(layers))} distinct layers but k is {k}")
        seed = data.get("seed")
        if (selector, k, seed) in owner:
            raise ValueError(f"{path}: selector '{selector}' at K={k} is also given in {owner[selector, k, seed]}")
        owner[selector, k, seed] = str(path)
        records.append(dict(source=str(path), selector=selector, k=k, seed=seed, softmax_layers=tuple(sorted(layers))))
    return pd.DataFrame(records, columns=["source", "selector", "k", "seed", "softmax_layers"])


def load_early_stop(path: Path) -> dict:
    """The early-stop trace, checked; `rounds` is returned as a DataFrame (None series entries become NaN)."""
    path = Path(path)
    data = read_json_object(path)
    _get(data, "enabled", path, lambda v: isinstance(v, bool), "true or false")
    _get(data, "k", path, lambda v: _is_int(v) and v >= 1, "a positive integer")
    _get(data, "window", path, lambda v: _is_int(v) and v >= 1, "a positive integer")
    thresholds = _get(data, "thresholds", path, lambda v: isinstance(v, dict), "an object")
    for key in ("min_mean_jaccard", "min_backbone", "max_union"):
        _get(thresholds, key, path, _is_number, "a number", "thresholds: ")
    fired = _get(data, "fired", path, lambda v: isinstance(v, bool), "true or false")
    for key in ("fired_round", "fired_step"):
        check = (lambda v: _is_int(v)) if fired else _optional_int
        _get(data, key, path, check, "an integer (the stop fired)" if fired else "null or an integer")
    for key in ("tokens_spent", "tokens_full_budget"):
        _get(data, key, path, lambda v: _is_number(v) and v >= 0, "a non-negative number")
    rounds = _get(data, "rounds", path, lambda v: isinstance(v, list), "a list")
    for index, entry in enumerate(rounds):
        where = f"rounds[{index}]: "
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {where}expected an object, got {entry!r}")
        _get(entry, "round", path, _is_int, "an integer", where)
        _get(entry, "step", path, _is_int, "an integer", where)
        _get(entry, "top_k", path, _layer_list, "a list of layer indices", where)
        _get(entry, "mean_jaccard", path, lambda v: v is None or _is_number(v), "null or a number", where)
        _get(entry, "backbone", path, _optional_int, "null or an integer", where)
        _get(entry, "union", path, _optional_int, "null or an integer", where)
    frame = pd.DataFrame(rounds, columns=["round", "step", "top_k", "mean_jaccard", "backbone", "union"])
    for column in ("mean_jaccard", "backbone", "union"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return {**data, "rounds": frame, "source": str(path)}
