"""The teacher's final hidden states of the first training sequences, written once per run, so that every
stage-2 job reading the same stream skips the teacher's transformer body (its lm_head still runs in the KL).

Exactness: row i holds what the live teacher computes for training sequence i on the same device type under the
same autocast dtype (both recorded, and checked at every use). The writer runs the batches the trainer runs
(`micro_batch_size` rows from multiples of it), so for readers with that micro-batch size the rows are
bit-identical (tested on CPU); other sizes differ at most by the kernels' batch-shape rounding. Under bf16
autocast the rows are stored in bf16: the KL's head matmul runs under the same autocast and rounds the fp32
hidden state to bf16 itself, so storing the rounded value changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hybrid_distill.data.packed import file_sha256, read_manifest_json
from hybrid_distill.distill.atomic import fsync_path, write_text_atomic
from hybrid_distill.distill.precision import active_autocast_dtype

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# torch dtype name -> numpy dtype of the same width on disk (numpy has no bfloat16)
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
CHECKED_KEYS = ("teacher_fingerprint", "data_sha256", "seq_len", "hidden_size")


class TeacherCacheError(ValueError):
    """A cache file that does not belong to this teacher, data or precision, or is incomplete; names the file."""


def sidecar_path(bin_path: str | os.PathLike) -> Path:
    return Path(bin_path).with_suffix(".json")


def sequences_to_cache(available: int, sequences_read: int, bytes_per_sequence: int, max_gb: float) -> int:
    """The leading sequences worth caching: those stage-2 jobs read, as many as fit in `max_gb` (1e9 bytes)."""
    return max(0, min(available, sequences_read, int(max_gb * 1e9) // bytes_per_sequence))


def teacher_fingerprint(teacher_dir: str | os.PathLike) -> str:
    """sha256 over the teacher directory's config and weight files: a re-exported or other teacher differs."""
    teacher_dir = Path(teacher_dir)
    files = sorted([teacher_dir / "config.json", *teacher_dir.glob("*.safetensors"), *teacher_dir.glob("*.bin")])
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def write_teacher_cache(teacher, data, num_sequences: int, micro_batch_size: int, bin_path: str | os.PathLike, *,
                        autocast_dtype: torch.dtype | None, identity: dict) -> dict:
    """Write rows [0, num_sequences) of `data` through `teacher.model` to `bin_path` and its JSON sidecar.

    `identity` must give CHECKED_KEYS' teacher_fingerprint and data_sha256 (readers compare them). The data file is
    renamed into place first and the sidecar last, so a sidecar means "complete". Returns the sidecar written.
    """
    bin_path, meta_path = Path(bin_path), sidecar_path(bin_path)
    device = next(teacher.parameters()).device
    hidden_size, seq_len = teacher.config.hidden_size, data.seq_len
    stored = autocast_dtype or next(teacher.parameters()).dtype
    meta = {"format": CACHE_FORMAT, **identity, "num_sequences": num_sequences, "seq_len": seq_len,
            "hidden_size": hidden_size, "dtype": _dtype_name(stored), "device_type": device.type,
            "autocast_dtype": None if autocast_dtype is None else _dtype_name(autocast_dtype),
            "micro_batch_size": micro_batch_size}
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an old sidecar must not vouch for a half-replaced data file
    staging = bin_path.with_name(f".{bin_path.name}.partial")
    storage = np.dtype(STORAGE[meta["dtype"]])
    with open(staging, "wb") as handle:
        handle.truncate(num_sequences * seq_len * hidden_size * storage.itemsize)
    if num_sequences:
        rows = np.memmap(staging, dtype=storage, mode="r+", shape=(num_sequences, seq_len, hidden_size))
        for first in tqdm(range(0, num_sequences, micro_batch_size), desc="teacher cache", unit="batch"):
            size = min(micro_batch_size, num_sequences - first)
            input_ids = data.batch(first, size).to(device)
            with nullcontext() if autocast_dtype is None else torch.autocast(device.type, dtype=autocast_dtype):
                hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
            rows[first:first + size] = _to_storage(hidden.to(stored).cpu())
        rows.flush()
        del rows
    fsync_path(staging)
    os.replace(staging, bin_path)
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %d sequences x %d tokens x %d (%s)", bin_path, num_sequences, seq_len, hidden_size,
             meta["dtype"])
    return meta


def _to_storage(hidden: torch.Tensor) -> np.ndarray:
    if hidden.dtype == torch.bfloat16:
        return hidden.view(torch.int16).numpy()
    return hidden.numpy()


class TeacherCache:
    """Read side: checked against this job's teacher, data and shapes when opened; rows by sequence index."""

    def __init__(self, bin_path: str | os.PathLike, expected: dict):
        self.bin_path = Path(bin_path)
        self.meta = _read_sidecar(self.bin_path, expected)
        shape = (self.meta["num_sequences"], self.meta["seq_len"], self.meta["hidden_size"])
        storage = np.dtype(STORAGE[self.meta["dtype"]])
        self.rows_on_disk = np.memmap(self.bin_path, dtype=storage, mode="r", shape=shape) if shape[0] else None
        self.dtype = getattr(torch, self.meta["dtype"])

    @property
    def num_sequences(self) -> int:
        return self.meta["num_sequences"]

    def covers(self, sequence_indices: Sequence[int]) -> bool:
        return all(0 <= index < self.num_sequences for index in sequence_indices)

    def rows(self, sequence_indices: Sequence[int], device_type: str) -> torch.Tensor:
        """[batch, seq_len, hidden] for indices the cache covers, after checking the caller's precision."""
        self._check_context(device_type)
        rows = torch.from_numpy(self.rows_on_disk[np.asarray(sequence_indices, dtype=np.int64)])
        return rows.view(self.dtype) if self.dtype == torch.bfloat16 else rows

    def _check_context(self, device_type: str) -> None:
        autocast = active_autocast_dtype(device_type)
        here = (device_type, None if autocast is None else _dtype_name(autocast))
        written = (self.meta["device_type"], self.meta["autocast_dtype"])
        if here != written:
            raise TeacherCacheError(f"{self.bin_path}: written on {written[0]} with autocast {written[1]}, read on "
                                    f"{here[0]} with autocast {here[1]}; the rows would not be the live teacher's")


def _read_sidecar(bin_path: Path, expected: dict) -> dict:
    """The sidecar after checking it against `expected` and the data file's size; one-line errors name the file."""
    meta_path = sidecar_path(bin_path)
    meta = read_manifest_json(meta_path, TeacherCacheError, "teacher cache sidecar", "the cache")
    required = ("format", "num_sequences", "dtype", "device_type", "autocast_dtype", *CHECKED_KEYS)
    if not isinstance(meta, dict) or any(key not in meta for key in required):
        raise TeacherCacheError(f"{meta_path}: not a teacher cache sidecar (needs {', '.join(required)})")
    if meta["format"] != CACHE_FORMAT or meta["dtype"] not in STORAGE:
        raise TeacherCacheError(f"{meta_path}: format {meta['format']} / dtype {meta['dtype']!r} is not readable here")
    for key in CHECKED_KEYS:
        if meta[key] != expected[key]:
            raise TeacherCacheError(f"{bin_path}: stale teacher cache: {key} is {meta[key]!r}, this job has "
                                    f"{expected[key]!r}; delete it to recompute")
    if not bin_path.is_file():
        raise TeacherCacheError(f"{bin_path}: teacher cache data file missing (its sidecar exists)")
    itemsize = np.dtype(STORAGE[meta["dtype"]]).itemsize
    expected_bytes = meta["num_sequences"] * meta["seq_len"] * meta["hidden_size"] * itemsize
    if bin_path.stat().st_size != expected_bytes:
        raise TeacherCacheError(f"{bin_path}: size is {bin_path.stat().st_size} bytes but its sidecar promises "
                                f"{expected_bytes}; the file is truncated or stale")
    return meta
