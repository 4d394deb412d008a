"""Score, signal and selection files the selection jobs pass on: reading them back, or one clear error naming the file.

No torch here: the workflow's local rules (per-round decisions, rankings, selections) import only this side.
"""
from __future__ import annotations

import json
from pathlib import Path


class ScoreFileError(ValueError):
    """A score or decision file that is missing a field or is not JSON; the message names the file."""


def read_score(path: Path, field: str = "heldout_kl") -> dict:
    try:
        payload = json.loads(Path(path).read_text())
        float(payload[field])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"score file {path} is corrupt or incomplete ({type(error).__name__}: {error})") from None
    return payload


def signals_to_json(signals: dict[str, dict[int, float]]) -> dict:
    return {name: {str(layer): value for layer, value in values.items()} for name, values in signals.items()}


def signals_from_json(path: Path) -> dict[str, dict[int, float]]:
    try:
        payload = json.loads(Path(path).read_text())
        return {name: {int(layer): float(v) for layer, v in values.items()} for name, values in payload.items()}
    except (OSError, json.JSONDecodeError, AttributeError, ValueError) as error:
        raise ScoreFileError(f"signal file {path} is corrupt ({type(error).__name__}: {error})") from None


def read_selection(path: Path) -> list[int]:
    try:
        return [int(i) for i in json.loads(Path(path).read_text())["softmax_layers"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"selection file {path} is corrupt ({type(error).__name__}: {error})") from None


def read_importance_csv(path: Path) -> dict[int, float]:
    import csv

    try:
        with open(path) as handle:
            return {int(row["layer"]): float(row["importance"]) for row in csv.DictReader(handle)}
    except (OSError, KeyError, ValueError) as error:
        raise ScoreFileError(f"importance file {path} is corrupt ({type(error).__name__}: {error})") from None
