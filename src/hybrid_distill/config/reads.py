"""What each job step reads of the run config, as named slices.

The workflow writes one file per slice (results/<run>/config/<slice>.yaml) and a job takes only its slice's file as
input, so Snakemake reruns a job exactly when something it reads changed: adding a selector, a random seed or an
evaluation task retrains nothing, and a new stage-2 learning rate leaves stage 1 alone. A step that reads a key its
slice lacks fails at once, naming the key and this table, instead of silently depending on an untracked value.
"""
from __future__ import annotations

import copy

SLICE_KEY = "_slice"  # the name of the slice a file holds; a full run config has none

# slice -> dotted config paths the steps given it read; "!path" drops a part of a path listed before it.
SLICES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher",),
    "data": ("seed", "data"),
    "teacher-cache": ("distill.teacher_cache", "distill.stage2.tokens", "distill.stage2.micro_batch_size",
                      "scoring.stage2.tokens"),
    "stage1": ("seed", "mixer", "distill", "!distill.stage2", "!distill.teacher_cache", "scoring.heldout_sequences"),
    "stage2": ("seed", "distill", "!distill.stage1", "!distill.teacher_cache"),
    "scoring": ("seed", "distill", "!distill.stage1", "!distill.stage2", "!distill.teacher_cache", "scoring.stage2",
                "scoring.trainable", "scoring.snapshot_every", "scoring.snapshots_per_job",
                "scoring.heldout_sequences"),
    "rounds": ("scoring", "distill.stage1.tokens", "distill.stage2.tokens"),
    "bypass-signals": ("seed", "selection.probe_sequences", "evaluate.context_lengths"),
    "stage1-signals": ("scoring.heldout_sequences", "distill.temperature", "distill.kl_chunk_tokens"),
    "recall-data": ("seed", "evaluate.recall_tasks", "evaluate.context_lengths", "evaluate.num_examples",
                    "evaluate.haystack"),
    "evaluate": ("data.heldout_sequences", "evaluate.recall_tasks", "evaluate.context_lengths",
                 "evaluate.lm_eval_tasks", "evaluate.batch_size", "evaluate.dtype", "evaluate.samples_per_task"),
    "efficiency": ("evaluate.efficiency_contexts", "evaluate.efficiency_batches", "evaluate.efficiency_decode_tokens",
                   "evaluate.efficiency_repeats", "evaluate.dtype", "evaluate.efficiency_cuda_graphs"),
}


class UnreadKey(KeyError):
    """A step read a config key its slice does not list."""

    def __str__(self) -> str:
        return self.args[0]


class SliceView(dict):
    """One level of a slice: reading a key it lacks raises UnreadKey naming the key and the slice."""

    def __init__(self, values: dict, slice_name: str, prefix: str = ""):
        super().__init__({key: SliceView(value, slice_name, f"{prefix}{key}.") if isinstance(value, dict) else value
                          for key, value in values.items()})
        self.slice_name, self.prefix = slice_name, prefix

    def __missing__(self, key):
        raise UnreadKey(f"config key {self.prefix}{key} is not in the {self.slice_name!r} slice that this step was "
                        f"given: add it to SLICES in hybrid_distill/config/reads.py")

    def get(self, key, default=None):
        return self[key]

    def __deepcopy__(self, memo):
        return SliceView(copy.deepcopy(dict(self), memo), self.slice_name, self.prefix)


def _get(config: dict, path: list[str]):
    node = config
    for key in path:
        node = node[key]
    return node


def config_slice(config: dict, name: str) -> dict:
    """The parts of a validated run config that slice `name` lists (plain nested dicts, ready to write)."""
    if name not in SLICES:
        raise KeyError(f"unknown config slice {name!r}; known: {', '.join(SLICES)}")
    out: dict = {}
    for entry in SLICES[name]:
        drop = entry.startswith("!")
        path = entry.lstrip("!").split(".")
        parent = out
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        if drop:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = copy.deepcopy(_get(config, path))
    return out


def slice_file_content(config: dict, name: str) -> dict:
    """What results/<run>/config/<name>.yaml holds: the slice and its name."""
    return {SLICE_KEY: name, **config_slice(config, name)}


def view_of(raw: dict) -> SliceView:
    """A slice file's content as the step's config."""
    values = {key: value for key, value in raw.items() if key != SLICE_KEY}
    return SliceView(values, raw[SLICE_KEY])
