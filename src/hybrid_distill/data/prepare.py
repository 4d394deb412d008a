"""Turn a configured source into packed train and held-out streams, with held-out drawn from unseen documents."""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from hybrid_distill.data.packed import DataError, token_dtype, write_packed
from hybrid_distill.data.sources import iter_file_texts, iter_hf_texts
from hybrid_distill.data.teacher_samples import sample_from_teacher

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("hf", "files", "teacher")
TOKENIZE_BATCH_DOCUMENTS = 256  # fast tokenizers encode a list in parallel; one call per document is much slower
HELDOUT_RULE = (
    "the first documents of the source fill held-out; the rest of the document that completes held-out is "
    "dropped, and train starts at the next document"
)
TEACHER_HELDOUT_SEED_OFFSET = 1_000_003  # held-out samples use seed + this, so they never replay a train seed


def _required(source: dict, key: str):
    """A source key the chosen kind cannot do without, named by its config path when absent."""
    if key not in source:
        raise DataError(f"data.source.{key} is required when data.source.kind is {source.get('kind')!r}")
    return source[key]


def describe_source(source: dict) -> str:
    """One readable line naming the source, for manifests, logs and errors."""
    kind = source.get("kind")
    if kind == "hf":
        return f"hf:{source.get('dataset')} subset={source.get('subset')} split={source.get('split')}"
    if kind == "files":
        return f"files:{source.get('globs')}"
    return f"teacher: temperature={source.get('temperature')} top_p={source.get('top_p')}"


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def iter_documents(source: dict) -> Iterator[str]:
    """The text documents of an `hf` or `files` source, in a fixed order."""
    kind = source.get("kind")
    if kind == "hf":
        return iter_hf_texts(
            dataset=_required(source, "dataset"), split=_required(source, "split"),
            text_field=_required(source, "text_field"), subset=source.get("subset"),
            data_files=source.get("data_files"),
        )
    if kind == "files":
        return iter_file_texts(_required(source, "globs"), text_field=_required(source, "text_field"))
    raise DataError(f"data.source.kind is {kind!r}; text documents come only from 'hf' or 'files'")


def iter_document_tokens(documents: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Each document's ids followed by EOS, so packed rows mark where one document ends and the next begins."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError(f"tokenizer {tokenizer_name(tokenizer)!r} has no EOS token to separate documents")
    documents = iter(documents)
    while batch := list(islice(documents, TOKENIZE_BATCH_DOCUMENTS)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield list(ids) + [eos_id]


def fill_rows(document_tokens: Iterator[list[int]], buffer: np.ndarray) -> tuple[int, int]:
    """Fill `buffer` (flat) from whole documents in order; returns (tokens filled, documents consumed).

    The document that fills the buffer is consumed entirely, its tail discarded, so the next split starts clean.
    """
    filled = documents_used = 0
    for ids in document_tokens:
        documents_used += 1
        take = min(len(ids), buffer.size - filled)
        buffer[filled:filled + take] = ids[:take]
        filled += take
        if filled == buffer.size:
            break
    return filled, documents_used


def prepare_text_splits(
    source: dict, tokenizer, seq_len: int, train_sequences: int, heldout_sequences: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenize, pack and split a text source; train rows are shuffled with `seed` so each batch mixes documents."""
    dtype = token_dtype(len(tokenizer))
    heldout_buffer = np.zeros(heldout_sequences * seq_len, dtype=dtype)
    train_buffer = np.zeros(train_sequences * seq_len, dtype=dtype)
    with tqdm(iter_documents(source), desc="tokenizing", unit="doc", disable=None) as documents:
        document_tokens = iter_document_tokens(documents, tokenizer)
        heldout_filled, heldout_documents = fill_rows(document_tokens, heldout_buffer)
        train_filled, train_documents = 0, 0
        if heldout_filled == heldout_buffer.size:
            train_filled, train_documents = fill_rows(document_tokens, train_buffer)
    if heldout_filled < heldout_buffer.size or train_filled < train_buffer.size:
        available = (heldout_filled + train_filled) // seq_len
        raise DataError(
            f"{describe_source(source)} holds text for only {available} sequences of {seq_len} tokens; "
            f"requested {heldout_sequences} held-out + {train_sequences} train = {heldout_sequences + train_sequences}"
        )
    train_order = np.random.default_rng(seed).permutation(train_sequences)
    train_rows = train_buffer.reshape(train_sequences, seq_len)[train_order]
    counts = {"heldout_documents": heldout_documents, "train_documents": train_documents}
    return train_rows, heldout_buffer.reshape(heldout_sequences, seq_len), counts


def prepare_teacher_splits(
    source: dict, tokenizer, teacher, seq_len: int, train_sequences: int, heldout_sequences: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample train and held-out from the teacher under different seeds, so held-out is not a replay of train."""
    if teacher is None:
        raise DataError("data.source.kind is 'teacher' but no teacher model was given to prepare_data")
    settings = dict(
        temperature=_required(source, "temperature"), top_p=_required(source, "top_p"),
        batch_size=_required(source, "batch_size"), prompts=source.get("prompts"),
    )
    heldout_rows = sample_from_teacher(
        teacher, tokenizer, heldout_sequences, seq_len, seed=seed + TEACHER_HELDOUT_SEED_OFFSET, **settings
    )
    train_rows = sample_from_teacher(teacher, tokenizer, train_sequences, seq_len, seed=seed, **settings)
    return train_rows, heldout_rows, {}


def prepare_data(
    source: dict,
    tokenizer,
    out_dir,
    seq_len: int,
    train_sequences: int,
    heldout_sequences: int,
    seed: int = 0,
    teacher=None,
) -> dict:
    """Write out_dir/train.{bin,json} and out_dir/heldout.{bin,json} from `source`; returns token counts."""
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise DataError(f"data.source.kind is {kind!r}; allowed values are {', '.join(SOURCE_KINDS)}")
    sizes = {"seq_len": seq_len, "train_sequences": train_sequences, "heldout_sequences": heldout_sequences}
    for key, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"data.{key} must be a positive integer, got {value!r}")
    logger.info("preparing %s: %d train + %d held-out sequences of %d tokens", describe_source(source),
                train_sequences, heldout_sequences, seq_len)
    if kind == "teacher":
        train_rows, heldout_rows, counts = prepare_teacher_splits(
            source, tokenizer, teacher, seq_len, train_sequences, heldout_sequences, seed
        )
        vocab_size = teacher.get_input_embeddings().num_embeddings
    else:
        train_rows, heldout_rows, counts = prepare_text_splits(
            source, tokenizer, seq_len, train_sequences, heldout_sequences, seed
        )
        vocab_size = len(tokenizer)

    out_dir = Path(out_dir)
    common_meta = {
        "vocab_size": vocab_size, "tokenizer": tokenizer_name(tokenizer), "source": describe_source(source),
        "source_config": dict(source), "seed": seed,
    }
    if kind != "teacher":
        common_meta["heldout_rule"] = HELDOUT_RULE
    write_packed(out_dir / "heldout.bin", heldout_rows, {**common_meta, "split": "heldout"})
    write_packed(out_dir / "train.bin", train_rows, {**common_meta, "split": "train"})
    summary = {
        "source": describe_source(source),
        "seq_len": seq_len,
        "train_sequences": train_sequences,
        "heldout_sequences": heldout_sequences,
        "train_tokens": train_sequences * seq_len,
        "heldout_tokens": heldout_sequences * seq_len,
        **counts,
    }
    logger.info("prepared data in %s: %s", out_dir, summary)
    return summary
