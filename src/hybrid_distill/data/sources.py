"""Text sources: each yields documents as plain strings, streamed so no corpus is held in memory."""
from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Iterator

from hybrid_distill.data.packed import DataError

logger = logging.getLogger(__name__)

DEFAULT_HF_DATASET = "mlfoundations/dclm-baseline-1.0-parquet"  # the paper's DCLM pretraining text
JSON_LINES_SUFFIXES = (".jsonl", ".json")
TEXT_FILE_SUFFIXES = JSON_LINES_SUFFIXES + (".parquet", ".txt")


def iter_hf_texts(
    dataset: str = DEFAULT_HF_DATASET,
    split: str = "train",
    text_field: str = "text",
    subset: str | None = None,
    data_files: str | list[str] | None = None,
) -> Iterator[str]:
    """Stream `text_field` of a Hugging Face dataset (or of local files via a builder such as "json" + data_files)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    try:
        stream = load_dataset(dataset, subset, split=split, data_files=data_files, streaming=True)
    except (DatasetNotFoundError, FileNotFoundError) as error:
        raise DataError(f"dataset {dataset!r} (subset={subset!r}, data_files={data_files!r}): {error}") from None
    logger.info("streaming %s subset=%s split=%s field=%s", dataset, subset, split, text_field)
    return _iter_rows(stream, f"dataset {dataset!r} split {split!r}", text_field)


def _iter_rows(stream, description: str, text_field: str) -> Iterator[str]:
    """Texts of a row stream; a generator apart from the loader so that loading errors surface at the call."""
    for row_number, row in enumerate(stream):
        if text_field not in row:
            raise DataError(
                f"{description} has no text field {text_field!r} "
                f"(row {row_number} has {', '.join(sorted(row))})"
            )
        text = row[text_field]
        if text:
            yield text


def expand_globs(globs: list[str]) -> list[Path]:
    """Files matched by `globs`, each glob sorted and duplicates dropped, so the document order is reproducible."""
    if isinstance(globs, str):
        globs = [globs]
    matched: dict[Path, None] = {}
    for pattern in globs:
        paths = sorted(Path(hit) for hit in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        files = [path for path in paths if path.is_file()]
        if not files:
            raise DataError(f"data.source.globs: no file matches {pattern!r}")
        matched.update(dict.fromkeys(files))
    return list(matched)


def _iter_json_lines(path: Path, text_field: str) -> Iterator[str]:
    """One JSON object per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not a JSON object per line ({error.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{line_number}: no text field {text_field!r}")
            if record[text_field]:
                yield record[text_field]


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Read the one column in record batches, so large shards stream."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no text field {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for record_batch in parquet.iter_batches(columns=[text_field]):
        for text in record_batch.column(0).to_pylist():
            if text:
                yield text


def iter_file_texts(globs: list[str], text_field: str = "text") -> Iterator[str]:
    """Documents from local files, in glob order.

    .jsonl/.json hold one object per line, .parquet a column, and a .txt file is one whole document.
    """
    paths = expand_globs(globs)
    for path in paths:  # check every suffix before the first document, not hours into a run
        if path.suffix.lower() not in TEXT_FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(TEXT_FILE_SUFFIXES)}")
    logger.info("reading %d files matched by %s", len(paths), globs)
    return _iter_documents(paths, text_field)


def _iter_documents(paths: list[Path], text_field: str) -> Iterator[str]:
    """Documents of already-checked files, in order."""
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in JSON_LINES_SUFFIXES:
            yield from _iter_json_lines(path, text_field)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, text_field)
        else:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield text
