"""Concrete lm-eval tasks for the generated recall files: one YAML per (task, length) plus a group.

The YAMLs include the per-task files shipped in evaluate/tasks/ and set only the task name and the
data file, so the data location is decided when the task folder is written. Use it as

    TaskManager(include_path=str(task_dir), include_defaults=False)
    lm_eval.simple_evaluate(model=..., tasks=["hd_recall"], task_manager=...)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

from hybrid_distill.evaluate.recall_tasks import check_task, task_file_name, write_text_atomic

log = logging.getLogger(__name__)

TASK_TEMPLATES_DIR = Path(__file__).resolve().parent / "tasks"
GROUP_NAME = "hd_recall"
TASK_VERSION = 1.0


def lm_eval_task_name(task: str, context_length: int) -> str:
    return f"hd_{task}_{context_length}"


def build_task_dir(data_dir, out_dir, tasks: Sequence[str], context_lengths: Sequence[int],
                   datasets_cache_dir=None) -> Path:
    """Write hd_<task>_<length>.yaml for every pair and the group hd_recall over them; return out_dir.

    data_dir must hold the files write_task_files made. datasets_cache_dir, if given, keeps the
    Hugging Face `datasets` copies of the JSONL there instead of in the user's cache.
    """
    data_dir = Path(data_dir).resolve()
    out_dir = Path(out_dir).resolve()
    if not tasks or not context_lengths:
        raise ValueError("build_task_dir needs at least one task and one context length")
    for task in tasks:
        check_task(task)
    missing = [str(data_dir / task_file_name(t, n)) for t in tasks for n in context_lengths
               if not (data_dir / task_file_name(t, n)).is_file()]
    if missing:
        raise FileNotFoundError(f"recall data file not found: {missing[0]} (run write_task_files first)")
    out_dir.mkdir(parents=True, exist_ok=True)

    names = []
    for task in tasks:
        for context_length in context_lengths:
            name = lm_eval_task_name(task, context_length)
            dataset_kwargs = {"data_files": {"test": str(data_dir / task_file_name(task, context_length))}}
            if datasets_cache_dir is not None:
                dataset_kwargs["cache_dir"] = str(Path(datasets_cache_dir).resolve())
            config = {
                "include": str(TASK_TEMPLATES_DIR / f"{task}.yaml"),
                "task": name,
                "dataset_kwargs": dataset_kwargs,
                "metadata": {"version": TASK_VERSION, "recall_task": task, "context_length": context_length},
            }
            write_text_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
            names.append(name)
    group = {
        "group": GROUP_NAME,
        "task": names,
        # every (task, length) counts once, whatever its number of examples, as in RULER's average
        "aggregate_metric_list": [
            {"metric": metric, "aggregation": "mean", "weight_by_size": False}
            for metric in ("string_match_all", "string_match_part")
        ],
        "metadata": {"version": TASK_VERSION},
    }
    write_text_atomic(out_dir / f"{GROUP_NAME}.yaml", yaml.safe_dump(group, sort_keys=False))
    log.info("wrote %d recall tasks and group %s to %s", len(names), GROUP_NAME, out_dir)
    return out_dir
