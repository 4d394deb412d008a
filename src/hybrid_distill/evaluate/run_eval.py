"""Evaluate one checkpoint: lm-eval tasks through the `hybrid` model type, plus held-out perplexity, into one JSON.

Scores are named as the report reads them: a recall task `hd_<task>_<length>` becomes `<task>@<length>` with
RULER's string_match_all; any other lm-eval task keeps its name and its main metric.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid_distill.evaluate.recall_tasks import TASKS as RECALL_TASKS

log = logging.getLogger(__name__)

RECALL_METRIC = "string_match_all"
MAIN_METRICS = ("acc_norm", "acc")  # the first one a task reports wins; else its first numeric metric
RAW_KEYS = ("results", "groups", "group_subtasks", "versions", "n-samples", "higher_is_better", "config")
_RECALL_NAME = re.compile(r"hd_(?P<task>[a-z_]+)_(?P<length>\d+)")


def recall_score_name(lm_eval_task: str) -> str | None:
    """'hd_niah_single_512' -> 'niah_single@512'; None for a task that is not one of ours."""
    match = _RECALL_NAME.fullmatch(lm_eval_task)
    if not match or match["task"] not in RECALL_TASKS:
        return None
    return f"{match['task']}@{match['length']}"


def _metric(row: dict, name: str):
    """lm-eval keys metrics as '<metric>,<filter>'; take the metric under whichever filter it has."""
    for key, value in row.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def main_metric(row: dict) -> float | None:
    for name in MAIN_METRICS:
        value = _metric(row, name)
        if value is not None:
            return value
    for key, value in row.items():
        if "_stderr" in key or key in ("alias", "samples", "name", "sample_len", "sample_count"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def sample_excerpts(samples: dict, per_task: int, prompt_chars: int = 200) -> dict[str, list[dict]]:
    """The first `per_task` answers of each task with their targets: a score of 0 is read by looking at them.

    Only the prompt's last `prompt_chars` characters are kept (the question), not the haystack.
    """
    excerpts = {}
    for task, logged in sorted(samples.items()):
        rows = []
        for example in logged[:per_task]:
            arguments = example.get("arguments") or [[""]]
            prompt = str(arguments[0][0]) if arguments and arguments[0] else ""
            responses = example.get("filtered_resps") or [""]
            rows.append({"doc_id": example.get("doc_id"), "prompt_end": prompt[-prompt_chars:],
                         "target": example.get("target"), "response": responses[0]})
        excerpts[recall_score_name(task) or task] = rows
    return excerpts


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def collect_scores(output: dict, tasks: Sequence[str]) -> dict[str, float | None]:
    """One score per requested task; a group without an aggregate row contributes its subtasks' scores."""
    results, subtasks = output.get("results", {}), output.get("group_subtasks", {})
    scores: dict[str, float | None] = {}
    pending = list(tasks)
    while pending:
        task = pending.pop(0)
        recall_name = recall_score_name(task)
        row = results.get(task)
        if row is not None and recall_name is not None:
            scores[recall_name] = _finite_or_none(_metric(row, RECALL_METRIC))
        elif row is not None and main_metric(row) is not None:
            scores[task] = _finite_or_none(main_metric(row))
        elif subtasks.get(task):
            pending = list(subtasks[task]) + pending
        else:
            log.warning("lm-eval returned no score for task %s", task)
            scores[task] = None
    return scores


def json_safe(value):
    """Plain JSON (no NaN/Infinity, no objects): what json.loads in any language reads back."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    try:
        return json_safe(value.item())  # numpy and torch scalars
    except (AttributeError, ValueError, RuntimeError):
        return str(value)


def write_json_atomic(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path


@torch.no_grad()
def heldout_perplexity(model, data, num_sequences: int, batch_size: int,
                       chunk_tokens: int = 4096) -> tuple[float, float]:
    """(token-mean next-token NLL in nats, its exp) over the first `num_sequences` rows of `data`.

    Logits are formed `chunk_tokens` positions at a time from the final hidden states, so a large vocabulary
    never needs a [batch, length, vocab] tensor.
    """
    if num_sequences < 1 or batch_size < 1:
        raise ValueError(f"num_sequences and batch_size must be positive, got {num_sequences} and {batch_size}")
    num_sequences = min(num_sequences, data.num_sequences)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total_nll, total_tokens = 0.0, 0
    for first in range(0, num_sequences, batch_size):
        tokens = data.batch(first, min(batch_size, num_sequences - first)).to(device)
        hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = tokens[:, 1:].reshape(-1)
        for start in range(0, targets.numel(), chunk_tokens):
            logits = head(hidden[start:start + chunk_tokens]).float()
            total_nll += F.cross_entropy(logits, targets[start:start + chunk_tokens], reduction="sum").item()
        total_tokens += targets.numel()
    model.train(was_training)
    mean_nll = total_nll / total_tokens
    return mean_nll, math.exp(mean_nll) if mean_nll < 700 else math.inf


def _task_manager(task_dir: Path | None, tasks: Sequence[str]):
    """Only our recall folder when every task lives there: indexing lm-eval's thousands of tasks takes a while."""
    from lm_eval.tasks import TaskManager

    if task_dir is None:
        return TaskManager()
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"recall task folder not found: {task_dir} (run make-recall-data first)")
    local = {path.stem for path in task_dir.glob("*.yaml")}
    return TaskManager(include_path=str(task_dir), include_defaults=any(task not in local for task in tasks))


def evaluate_checkpoint(model_dir, tasks: list[str], task_dir: Path | None, out_json: Path, batch_size: int = 8,
                        limit: int | float | None = None, device: str | None = None, dtype: str = "auto",
                        extra: dict | None = None, heldout_dir: Path | None = None,
                        heldout_sequences: int = 0, samples_per_task: int = 0) -> dict:
    """Run `tasks` (and held-out perplexity when `heldout_dir` holds heldout.bin) and write `out_json` atomically.

    `device` None picks the GPU when there is one. `extra` (model name, kind, selector, ...) is merged into the
    top level of the JSON for the report. `samples_per_task` > 0 keeps that many answers per task under "samples".
    """
    import lm_eval

    from hybrid_distill.data.packed import PackedTokens
    from hybrid_distill.evaluate.lm_eval_model import HybridLM

    model_dir = Path(model_dir)
    task_manager = _task_manager(task_dir, tasks) if tasks else None  # bad paths fail before the model loads
    heldout = None
    if heldout_dir is not None and heldout_sequences > 0:
        heldout = PackedTokens(Path(heldout_dir) / "heldout.bin")
    lm = HybridLM(path=str(model_dir), dtype=dtype, device=device, batch_size=batch_size)
    scores: dict[str, float | None] = {}
    payload = {"model_dir": str(model_dir), "scores": scores, "raw": {}}
    if tasks:
        log.info("evaluating %s on %d lm-eval tasks", model_dir, len(tasks))
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                         log_samples=samples_per_task > 0)
        scores.update(collect_scores(output, tasks))
        payload["raw"] = json_safe({key: output[key] for key in RAW_KEYS if key in output})
        if samples_per_task > 0:
            payload["samples"] = json_safe(sample_excerpts(output.get("samples", {}), samples_per_task))
    if heldout is not None:
        mean_nll, ppl = heldout_perplexity(lm.model, heldout, heldout_sequences, batch_size)
        scores["heldout_ppl"] = _finite_or_none(ppl)
        payload["heldout"] = {"mean_nll": mean_nll, "ppl": _finite_or_none(ppl), "seq_len": heldout.seq_len,
                              "num_sequences": min(heldout_sequences, heldout.num_sequences)}
        log.info("%s: held-out perplexity %.3f", model_dir, ppl)
    payload.update(extra or {})
    write_json_atomic(out_json, json_safe(payload))
    log.info("wrote %s", out_json)
    return payload
