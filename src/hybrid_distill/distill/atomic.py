"""Publish files and directories so that a reader sees either the old content or the complete new one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a kill never loses written data; a node crash could)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path` and rename it into place."""
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
    """UTF-8 always, so a C locale cannot break non-ASCII text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def publish_dir(staging: Path, final: Path) -> None:
    """Rename a fully written `staging` directory to `final`, replacing an existing one."""
    for entry in staging.rglob("*"):
        if entry.is_file():
            fsync_path(entry)
    fsync_path(staging)
    if final.exists():  # only when a finished job is asked to save the same step again
        retired = final.with_name(f".{final.name}.retired")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        shutil.rmtree(retired)
    os.replace(staging, final)
    fsync_path(final.parent)


def write_json(path: Path, payload: dict) -> None:
    write_text_atomic(Path(path), json.dumps(payload, indent=2) + "\n")


def drop_training_state(out_dir: Path) -> None:
    """A finished job's model is its output; its resumable state (weights + AdamW moments) is only disk cost.

    Renamed before it is deleted, so a kill mid-delete never leaves a state that looks complete to a rerun.
    """
    state = Path(out_dir) / "state"
    if not state.exists():
        return
    retired = state.with_name(".state.retired")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(state, retired)
    shutil.rmtree(retired)
