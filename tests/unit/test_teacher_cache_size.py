"""How many training rows the teacher cache holds, and which rows a trainer batch reads."""
import numpy as np
import torch

from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill.teacher_cache import sequences_to_cache
from hybrid_distill.distill.trainer import batch_rows

SMOLLM2_ROW_BYTES = 512 * 576 * 2  # seq_len x hidden_size x bf16


def test_smollm2_gpu_config_caches_every_row_in_0_6_gb():
    assert sequences_to_cache(1024, 524288 // 512, SMOLLM2_ROW_BYTES, max_gb=4) == 1024
    assert 1024 * SMOLLM2_ROW_BYTES == 603_979_776


def test_max_gb_caps_the_rows_and_the_rest_run_live():
    assert sequences_to_cache(1024, 1024, SMOLLM2_ROW_BYTES, max_gb=0.3) == 508  # 3e8 // 589,824
    assert sequences_to_cache(1024, 1024, SMOLLM2_ROW_BYTES, max_gb=1e-4) == 0


def test_only_rows_stage2_reads_are_cached():
    assert sequences_to_cache(1024, 10, SMOLLM2_ROW_BYTES, max_gb=4) == 10
    paper_row_bytes = 2048 * 2048 * 2  # Qwen2.5-3B hidden 2048, seq_len 2048
    assert sequences_to_cache(300_000, 600_000_000 // 2048, paper_row_bytes, max_gb=4) == 476


def test_batch_rows_are_the_rows_data_batch_returns(tmp_path):
    tokens = np.arange(5 * 3).reshape(5, 3)
    write_packed(tmp_path / "train.bin", tokens, {"vocab_size": 64})
    data = PackedTokens(tmp_path / "train.bin")
    for first, size in [(0, 2), (3, 4), (7, 2), (0, 12)]:
        rows = batch_rows(first, size, data.num_sequences)
        assert torch.equal(data.batch(first, size), torch.from_numpy(tokens[rows]))
    assert batch_rows(3, 4, 5) == [3, 4, 0, 1]
