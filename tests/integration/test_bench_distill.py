"""The distillation benchmark's options on CPU at a tiny shape: what each row ran with, and what it reports.
(No speed is asserted: numbers come from benchmark runs on the GPU, docs/performance.md.)"""
import pytest
import torch

from hybrid_distill.distill.bench import format_table, run_benchmark
from hybrid_distill.distill.compiled_blocks import compile_dense_blocks
from hybrid_distill.models.student import build_student

pytestmark = pytest.mark.integration
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128)


def test_bench_records_its_options_and_the_most_expensive_kernels():
    result = run_benchmark(batch_size=2, seq_len=32, warmup=1, repeats=1, stages=["stage2"], students=["gdn"],
                           chunk_tokens=16, shape=TINY, stage2_steps=["naive", "project", "cached"],
                           activation_checkpointing=True, profile_top=4)
    assert result["options"]["activation_checkpointing"] is True and result["options"]["kl_chunk_tokens"] == 16
    assert [(row["step"], row["note"] != "") for row in result["rows"]] == [
        ("naive", False), ("project", False), ("cached", True)]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and 1 <= len(row["top_kernels"]) <= 4
        shares = [kernel["share"] for kernel in row["top_kernels"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    table = format_table(result)
    assert "activation_checkpointing True" in table
    assert table.count("-- top kernels") == 3


def test_compiled_dense_blocks_keep_names_and_outputs(teacher):
    torch.manual_seed(0)
    student = build_student(teacher, [0], "gdn")
    reference = build_student(teacher, [0], "gdn")
    reference.load_state_dict(student.state_dict())
    names = list(student.state_dict())
    compiled = compile_dense_blocks(student)
    assert compiled == 3 * teacher.config.num_hidden_layers + 1  # MLP and two norms per layer, the final norm
    assert list(student.state_dict()) == names
    tokens = torch.randint(0, teacher.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(student(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)
