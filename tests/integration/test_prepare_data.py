"""Data preparation end to end: the real SmolLM2 tokenizer on local text, and a tiny random teacher sampling data."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_models import tiny_teacher
from hybrid_distill.data.packed import DataError, PackedTokens
from hybrid_distill.data.prepare import prepare_data
from hybrid_distill.data.sources import iter_file_texts, iter_hf_texts
from hybrid_distill.data.teacher_samples import (
    DEFAULT_PROMPTS, prompt_prefixes, sample_from_teacher, sample_next_tokens,
)

pytestmark = pytest.mark.integration

DOCUMENT_ID = re.compile(r"\[doc (\d{4})\]")
STUB_TOKENIZER = SimpleNamespace(bos_token_id=1, eos_token_id=2, name_or_path="stub")


def write_documents(path, count: int) -> list[str]:
    """JSON Lines documents carrying a bracketed id at both ends, so any decoded row tells where it came from."""
    documents = [f"[doc {number:04d}] The quick brown fox number {number} jumps over the lazy dog. [doc {number:04d}]"
                 for number in range(count)]
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return documents


def document_ids(tokenizer, rows: torch.Tensor) -> set[int]:
    return {int(found) for row in rows for found in DOCUMENT_ID.findall(tokenizer.decode(row.tolist()))}


def files_source(*globs: str) -> dict:
    return {"kind": "files", "globs": list(globs), "text_field": "text"}


def test_files_source_packs_heldout_from_documents_train_never_sees(tmp_path, smollm2_tokenizer):
    write_documents(tmp_path / "corpus.jsonl", 120)
    summary = prepare_data(files_source(str(tmp_path / "*.jsonl")), smollm2_tokenizer, tmp_path / "out",
                           seq_len=32, train_sequences=16, heldout_sequences=4)
    train, heldout = PackedTokens(tmp_path / "out/train.bin"), PackedTokens(tmp_path / "out/heldout.bin")
    assert (train.num_sequences, train.seq_len, heldout.num_sequences, heldout.seq_len) == (16, 32, 4, 32)
    assert summary["train_tokens"] == 16 * 32 and summary["heldout_tokens"] == 4 * 32
    assert train.meta["dtype"] == "uint16" and train.meta["vocab_size"] == len(smollm2_tokenizer)

    heldout_rows, train_rows = heldout.batch(0, 4), train.batch(0, 16)
    heldout_ids = document_ids(smollm2_tokenizer, heldout_rows.reshape(1, -1))
    train_ids = document_ids(smollm2_tokenizer, train_rows)
    assert heldout_ids == set(range(len(heldout_ids)))  # the first documents, in order
    assert len(train_ids) > 10 and min(train_ids) > max(heldout_ids)
    assert summary["heldout_documents"] == max(heldout_ids) + 1
    first_document = smollm2_tokenizer("[doc 0000] The quick", add_special_tokens=False)["input_ids"]
    assert heldout_rows[0, :len(first_document)].tolist() == first_document
    assert (heldout_rows == smollm2_tokenizer.eos_token_id).sum() >= 3  # documents are separated by EOS


def test_same_seed_gives_identical_files(tmp_path, smollm2_tokenizer):
    write_documents(tmp_path / "corpus.jsonl", 60)
    for out in ("first", "second"):
        prepare_data(files_source(str(tmp_path / "corpus.jsonl")), smollm2_tokenizer, tmp_path / out,
                     seq_len=16, train_sequences=8, heldout_sequences=2, seed=3)
    for split in ("train.bin", "heldout.bin"):
        assert (tmp_path / "first" / split).read_bytes() == (tmp_path / "second" / split).read_bytes()


def test_too_little_text_says_available_and_requested(tmp_path, smollm2_tokenizer):
    write_documents(tmp_path / "corpus.jsonl", 5)
    with pytest.raises(DataError, match=r"files:.*corpus\.jsonl.*only \d+ sequences.*requested 2 held-out \+ 50 train"):
        prepare_data(files_source(str(tmp_path / "corpus.jsonl")), smollm2_tokenizer, tmp_path / "out",
                     seq_len=32, train_sequences=50, heldout_sequences=2)
    assert not (tmp_path / "out" / "train.json").exists()


def test_missing_glob_is_named(tmp_path, smollm2_tokenizer):
    pattern = str(tmp_path / "nowhere" / "*.jsonl")
    with pytest.raises(DataError, match=re.escape(pattern)):
        prepare_data(files_source(pattern), smollm2_tokenizer, tmp_path / "out",
                     seq_len=8, train_sequences=1, heldout_sequences=1)


def test_unknown_kind_names_key_and_allowed_values(tmp_path):
    with pytest.raises(DataError, match=r"data\.source\.kind is 'web'; allowed values are hf, files, teacher"):
        prepare_data({"kind": "web"}, STUB_TOKENIZER, tmp_path, seq_len=8, train_sequences=1, heldout_sequences=1)


def test_file_sources_read_jsonl_txt_and_parquet(tmp_path):
    import pandas as pd

    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_text("a whole file\n\nis one document\n")
    pd.DataFrame({"text": ["third", "fourth"]}).to_parquet(tmp_path / "c.parquet")
    globs = [str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt"), str(tmp_path / "*.parquet")]
    assert list(iter_file_texts(globs)) == ["first", "second", "a whole file\n\nis one document\n", "third", "fourth"]


def test_missing_text_field_names_file_and_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: no text field 'text'"):
        list(iter_file_texts([str(tmp_path / "a.jsonl")]))
    with pytest.raises(DataError, match=r"dataset 'json' split 'train' has no text field 'text' \(row 0 has body\)"):
        list(iter_hf_texts("json", data_files=str(tmp_path / "a.jsonl")))
    assert list(iter_hf_texts("json", data_files=str(tmp_path / "a.jsonl"), text_field="body")) == ["no text here"]


def teacher_source(**overrides) -> dict:
    return {"kind": "teacher", "temperature": 1.0, "top_p": 0.95, "batch_size": 4, "prompts": [], **overrides}


def test_teacher_source_shape_range_and_seeding(tmp_path):
    model = tiny_teacher()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        summary = prepare_data(teacher_source(), STUB_TOKENIZER, tmp_path / name, seq_len=24,
                               train_sequences=6, heldout_sequences=3, seed=seed, teacher=model)
        runs[name] = {split: PackedTokens(tmp_path / name / f"{split}.bin").batch(0, count)
                      for split, count in (("train", 6), ("heldout", 3))}
    assert summary["train_tokens"] == 6 * 24
    train, heldout = runs["a"]["train"], runs["a"]["heldout"]
    assert train.shape == (6, 24) and heldout.shape == (3, 24)
    assert int(train.max()) < 128 and int(train.min()) >= 0
    assert (train[:, 0] == STUB_TOKENIZER.bos_token_id).all()
    assert torch.equal(train, runs["b"]["train"]) and torch.equal(heldout, runs["b"]["heldout"])
    assert not torch.equal(train, runs["c"]["train"])
    same_seed_heldout = sample_from_teacher(model, STUB_TOKENIZER, 3, 24, batch_size=4, top_p=0.95, seed=0, prompts=[])
    assert not np.array_equal(heldout.numpy(), same_seed_heldout)  # held-out is sampled under its own seed


def test_teacher_source_without_model_is_refused(tmp_path):
    with pytest.raises(DataError, match="no teacher model"):
        prepare_data(teacher_source(), STUB_TOKENIZER, tmp_path, seq_len=8, train_sequences=1, heldout_sequences=1)


def recompute_samples(model, start_id, rows, seq_len, temperature, top_p, seed):
    """Reference: every step re-runs the whole prefix without a cache."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, 1), start_id)
    with torch.no_grad():
        while ids.shape[1] < seq_len:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, sample_next_tokens(logits, temperature, top_p, generator)[:, None]], dim=1)
    return ids.numpy()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_sampling_matches_full_recompute(teacher, temperature):
    cached = sample_from_teacher(teacher, STUB_TOKENIZER, num_sequences=3, seq_len=20, batch_size=3,
                                 temperature=temperature, top_p=0.9, seed=5, prompts=[])
    recomputed = recompute_samples(teacher, STUB_TOKENIZER.bos_token_id, 3, 20, temperature, 0.9, seed=5)
    np.testing.assert_array_equal(cached, recomputed)


def test_default_prompts_open_the_sequences(smollm2_tokenizer):
    model = tiny_teacher(vocab_size=len(smollm2_tokenizer))
    prefixes = prompt_prefixes(smollm2_tokenizer, ["Once upon a time there was", "Q: why?"], max_length=16)
    why = smollm2_tokenizer("Q: why?", add_special_tokens=False)["input_ids"]
    assert prefixes.shape == (2, 1 + len(why))
    assert prefixes[1].tolist() == [smollm2_tokenizer.bos_token_id, *why]
    once = smollm2_tokenizer("Once upon a time there was", add_special_tokens=False)["input_ids"]
    assert prefixes[0, 1:].tolist() == once[-len(why):]  # left-truncated: the end, next to the generated text, stays

    samples = sample_from_teacher(model, smollm2_tokenizer, num_sequences=3, seq_len=16, batch_size=2, seed=0)
    default_prefixes = prompt_prefixes(smollm2_tokenizer, DEFAULT_PROMPTS, max_length=16)
    np.testing.assert_array_equal(samples[:, :default_prefixes.shape[1]], default_prefixes[:3].numpy())


def test_sampling_rules_exact():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 4.9]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_tokens(logits, 0.0, 0.9, generator).tolist() == [1, 0]
    # top_p below the top token's mass leaves only the top token
    assert all(sample_next_tokens(logits, 1.0, 0.01, generator).tolist() == [1, 0] for _ in range(20))
    # with full mass every token can appear
    seen = {tuple(sample_next_tokens(logits, 5.0, 1.0, generator).tolist()) for _ in range(200)}
    assert {row[0] for row in seen} == {0, 1, 2}
