"""Packed token streams: fixed-length rows of token ids in a raw memory-mapped `.bin` beside a `.json` manifest."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

REQUIRED_META_KEYS = ("seq_len", "num_sequences", "dtype", "vocab_size", "tokenizer", "source", "sha256")
ALLOWED_DTYPES = ("uint16", "uint32")
_HASH_CHUNK_BYTES = 1 << 24


class DataError(ValueError):
    """A data file or data setting the user can fix; the message names the file or key."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary, halving disk for small vocabs."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def meta_path_for(bin_path: str | os.PathLike) -> Path:
    """The manifest sits beside the data with the same stem, so one path names a packed stream."""
    return Path(bin_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB streams do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable; skipped where the OS cannot open directories (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, prefix: str, payload: bytes | memoryview) -> Path:
    """Write bytes to a fsynced temp file in `directory` so the later rename is atomic on the same filesystem."""
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return Path(temp_name)


def write_packed(bin_path: str | os.PathLike, tokens: np.ndarray, meta: dict) -> dict:
    """Write `tokens` [num_sequences, seq_len] and its manifest so readers see either the whole stream or none.

    `meta` must hold `vocab_size`; `tokenizer` and `source` are recorded as given. The data file is renamed into
    place first and the manifest last, since a manifest means "done". Returns the manifest written.
    """
    bin_path = Path(bin_path)
    json_path = meta_path_for(bin_path)
    if bin_path.suffix != ".bin":
        raise DataError(f"{bin_path}: a packed token file must end in .bin")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise DataError(f"{bin_path}: tokens must be a non-empty 2-D array [sequences, seq_len], got {tokens.shape}")
    if "vocab_size" not in meta:
        raise DataError(f"{bin_path}: meta must give vocab_size")
    vocab_size = int(meta["vocab_size"])
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DataError(
            f"{bin_path}: token ids span [{tokens.min()}, {tokens.max()}] but vocab_size is {vocab_size}"
        )
    dtype = token_dtype(vocab_size)
    data = np.ascontiguousarray(tokens, dtype=dtype)
    manifest = {
        "seq_len": int(data.shape[1]),
        "num_sequences": int(data.shape[0]),
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokenizer": meta.get("tokenizer"),
        "source": meta.get("source"),
        "sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest(),
    }
    manifest.update({key: value for key, value in meta.items() if key not in manifest})

    directory = bin_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # an old manifest must not vouch for a half-replaced data file
    temp_bin = temp_json = None
    placed_bin = False
    try:
        temp_bin = _write_temp(directory, f".{bin_path.name}.", memoryview(data).cast("B"))
        temp_json = _write_temp(directory, f".{json_path.name}.", (json.dumps(manifest, indent=2) + "\n").encode())
        os.replace(temp_bin, bin_path)
        placed_bin = True
        os.replace(temp_json, json_path)
        _fsync_directory(directory)
    except BaseException:
        for leftover in (temp_bin, temp_json):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        if placed_bin:
            bin_path.unlink(missing_ok=True)
        raise
    logger.info("wrote %s: %d sequences x %d tokens (%s)", bin_path, data.shape[0], data.shape[1], dtype.name)
    return manifest


def read_manifest_json(json_path: Path, error: type[Exception], name: str, owner: str):
    """The parsed JSON beside a data file; its absence means the writer never finished (it is written last)."""
    if not json_path.is_file():
        raise error(f"{json_path}: {name} missing ({owner} was never finished)")
    try:
        return json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as reason:
        raise error(f"{json_path}: {name} is not valid JSON ({reason})") from None


def read_packed_meta(bin_path: str | os.PathLike) -> dict:
    """Load and check the manifest against the data file, so a torn or foreign file fails before training starts."""
    bin_path = Path(bin_path)
    json_path = meta_path_for(bin_path)
    meta = read_manifest_json(json_path, DataError, "manifest", "the packed stream")
    if not isinstance(meta, dict):
        raise DataError(f"{json_path}: manifest must be a JSON object")
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise DataError(f"{json_path}: manifest lacks {', '.join(missing)}")
    if meta["dtype"] not in ALLOWED_DTYPES:
        raise DataError(f"{json_path}: dtype {meta['dtype']!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    for key in ("seq_len", "num_sequences", "vocab_size"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] <= 0:
            raise DataError(f"{json_path}: {key} must be a positive integer, got {meta[key]!r}")
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: data file missing (its manifest {json_path.name} exists)")
    expected_bytes = meta["num_sequences"] * meta["seq_len"] * np.dtype(meta["dtype"]).itemsize
    actual_bytes = bin_path.stat().st_size
    if actual_bytes != expected_bytes:
        raise DataError(
            f"{bin_path}: size is {actual_bytes} bytes but the manifest promises {expected_bytes} "
            f"({meta['num_sequences']} x {meta['seq_len']} {meta['dtype']}); the file is truncated or stale"
        )
    return meta


class PackedTokens:
    """Read-only random access to a packed stream; batches are a pure function of the step, so all jobs agree."""

    def __init__(self, bin_path: str | os.PathLike, verify_checksum: bool = False):
        self.bin_path = Path(bin_path)
        self.meta = read_packed_meta(self.bin_path)
        if verify_checksum and file_sha256(self.bin_path) != self.meta["sha256"]:
            raise DataError(f"{self.bin_path}: sha256 does not match its manifest; the data file is corrupt")
        self.tokens = np.memmap(
            self.bin_path, dtype=self.meta["dtype"], mode="r",
            shape=(self.meta["num_sequences"], self.meta["seq_len"]),
        )

    @property
    def num_sequences(self) -> int:
        return self.meta["num_sequences"]

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def __len__(self) -> int:
        return self.num_sequences

    def sequences(self, indices: Sequence[int] | np.ndarray) -> torch.LongTensor:
        """Rows `indices` (taken modulo num_sequences) as int64, copied out of the memory map."""
        row_indices = np.asarray(indices, dtype=np.int64).reshape(-1) % self.num_sequences
        return torch.from_numpy(self.tokens[row_indices].astype(np.int64))

    def batch(self, first_sequence: int, batch_size: int) -> torch.LongTensor:
        """`batch_size` rows from `first_sequence` on, wrapping so a budget beyond the data repeats it in order."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        start = first_sequence % self.num_sequences
        if start + batch_size <= self.num_sequences:  # the common case: one contiguous slice of the map
            return torch.from_numpy(self.tokens[start:start + batch_size].astype(np.int64))
        return self.sequences(np.arange(start, start + batch_size))

    def __repr__(self) -> str:
        return f"PackedTokens({str(self.bin_path)!r}, num_sequences={self.num_sequences}, seq_len={self.seq_len})"
