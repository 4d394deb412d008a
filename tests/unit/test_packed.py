"""Packed token streams: exact round trip, wrap-around batches, atomic writes and loud failure on damaged files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hybrid_distill.data.packed import DataError, PackedTokens, file_sha256, token_dtype, write_packed


def make_tokens(num_sequences: int = 5, seq_len: int = 4, vocab_size: int = 1000) -> np.ndarray:
    return (np.arange(num_sequences * seq_len).reshape(num_sequences, seq_len) * 7) % vocab_size


@pytest.fixture
def packed_path(tmp_path):
    path = tmp_path / "train.bin"
    write_packed(path, make_tokens(), {"vocab_size": 1000, "tokenizer": "stub", "source": "unit test"})
    return path


def test_round_trip_keeps_tokens_and_manifest(packed_path):
    packed = PackedTokens(packed_path, verify_checksum=True)
    assert (packed.num_sequences, packed.seq_len) == (5, 4)
    assert torch.equal(packed.batch(0, 5), torch.from_numpy(make_tokens()))
    assert packed.batch(0, 5).dtype == torch.long
    meta = json.loads(packed_path.with_suffix(".json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1000
    assert meta["tokenizer"] == "stub" and meta["source"] == "unit test"
    assert meta["sha256"] == file_sha256(packed_path)
    assert packed_path.stat().st_size == 5 * 4 * 2


def test_dtype_widens_for_large_vocabularies(tmp_path):
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    tokens = np.array([[0, 70_000, 151_000]])
    path = tmp_path / "wide.bin"
    write_packed(path, tokens, {"vocab_size": 152_000})
    assert PackedTokens(path).meta["dtype"] == "uint32"
    assert PackedTokens(path).batch(0, 1).tolist() == tokens.tolist()


def test_token_outside_vocabulary_is_refused(tmp_path):
    with pytest.raises(DataError, match="vocab_size is 10"):
        write_packed(tmp_path / "bad.bin", np.array([[1, 10]]), {"vocab_size": 10})


def test_batch_wraps_around_in_order(packed_path):
    packed = PackedTokens(packed_path)
    rows = torch.from_numpy(make_tokens())
    assert torch.equal(packed.batch(3, 4), rows[[3, 4, 0, 1]])
    assert torch.equal(packed.batch(7, 2), rows[[2, 3]])  # step beyond the data restarts from the top
    assert torch.equal(packed.batch(0, 12), rows[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    assert torch.equal(packed.sequences([4, 0, 6]), rows[[4, 0, 1]])


def test_reads_are_deterministic_across_openings(packed_path):
    first = [PackedTokens(packed_path).batch(step * 3, 3) for step in range(4)]
    second = [PackedTokens(packed_path).batch(step * 3, 3) for step in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_interrupted_write_leaves_no_final_files(tmp_path, monkeypatch):
    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_packed(tmp_path / "train.bin", make_tokens(), {"vocab_size": 1000})
    assert sorted(os.listdir(tmp_path)) == []  # no final files and no temp files left behind


def test_failure_after_data_rename_removes_the_data_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_data_only(source, destination):
        if str(destination).endswith(".json"):
            raise OSError("interrupted")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_data_only)
    with pytest.raises(OSError, match="interrupted"):
        write_packed(tmp_path / "train.bin", make_tokens(), {"vocab_size": 1000})
    assert sorted(os.listdir(tmp_path)) == []


def test_manifest_is_renamed_into_place_last(tmp_path, monkeypatch):
    real_replace = os.replace
    destinations = []

    def recording_replace(source, destination):
        destinations.append(os.path.basename(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    write_packed(tmp_path / "train.bin", make_tokens(), {"vocab_size": 1000})
    assert destinations == ["train.bin", "train.json"]
    assert sorted(os.listdir(tmp_path)) == ["train.bin", "train.json"]


def test_truncated_bin_is_detected(packed_path):
    with open(packed_path, "r+b") as handle:
        handle.truncate(packed_path.stat().st_size - 2)
    with pytest.raises(DataError, match=r"train\.bin: size is 38 bytes but the manifest promises 40"):
        PackedTokens(packed_path)


def test_corrupt_json_is_detected(packed_path):
    packed_path.with_suffix(".json").write_text('{"seq_len": 4, "num_seq')
    with pytest.raises(DataError, match=r"train\.json: manifest is not valid JSON"):
        PackedTokens(packed_path)


def test_manifest_missing_a_key_is_detected(packed_path):
    json_path = packed_path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    del meta["seq_len"]
    json_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="manifest lacks seq_len"):
        PackedTokens(packed_path)


def test_missing_manifest_means_unfinished(packed_path):
    packed_path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match=r"train\.json: manifest missing"):
        PackedTokens(packed_path)


def test_checksum_catches_flipped_bytes(packed_path):
    with open(packed_path, "r+b") as handle:
        handle.write(b"\xff\xff")
    PackedTokens(packed_path)  # sizes still agree, so only the checksum can tell
    with pytest.raises(DataError, match="sha256 does not match"):
        PackedTokens(packed_path, verify_checksum=True)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
