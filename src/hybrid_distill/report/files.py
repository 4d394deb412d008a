"""Atomic file output: a reader sees the old file or the complete new one, never a half-written table."""
from __future__ import annotations

import os
from pathlib import Path

from hybrid_distill.distill.atomic import fsync_path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temp file in the same directory and rename it over `path`."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    with open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_path(path.parent)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """UTF-8 always, so ± and – survive a C locale."""
    return write_bytes_atomic(path, text.encode("utf-8"))
