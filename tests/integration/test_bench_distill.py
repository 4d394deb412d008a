"""The distillation benchmark's options on CPU at a tiny shape: what each row ran with, and what it reports.
(No speed is asserted: numbers come from benchmark runs on the GPU, docs/performance.md.)"""
import copy
import json
import os
import subprocess

import pytest
import torch

from hybrid_distill import cli
from hybrid_distill.distill.bench import format_table, run_benchmark
from hybrid_distill.distill.compiled_blocks import (COORDINATE_DESCENT_SWITCH, compile_dense_blocks, compile_mixers,
                                                    compile_training_layers)
from hybrid_distill.models.student import build_student
from gloo_launch import needs_gloo, two_process_launcher

pytestmark = pytest.mark.integration
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128)


def test_bench_records_its_options_and_the_most_expensive_kernels(monkeypatch):
    monkeypatch.setenv("HD_SHORT_CONV", "fla")  # a mixer op switch (CPU tensors stay on PyTorch's ops)
    monkeypatch.delenv("HD_QK_L2NORM", raising=False)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(max_autotune=True, coordinate_descent_tuning=True):  # TORCHINDUCTOR_MAX_AUTOTUNE=1
        result = run_benchmark(batch_size=2, seq_len=32, warmup=1, repeats=1, stages=["stage2"], students=["gdn"],
                               chunk_tokens=16, shape=TINY, stage2_steps=["naive", "project", "cached"],
                               activation_checkpointing=True, profile_top=4)
    assert result["options"]["activation_checkpointing"] is True and result["options"]["kl_chunk_tokens"] == 16
    assert result["options"]["hd_short_conv"] == "fla" and "hd_qk_l2norm" not in result["options"]
    assert result["options"]["short_conv"] == "torch"  # what the CPU step ran
    assert result["options"]["inductor_max_autotune"] is result["options"]["inductor_coordinate_descent"] is True
    assert [(row["step"], row["note"] != "") for row in result["rows"]] == [
        ("naive", False), ("project", False), ("cached", True)]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and 1 <= len(row["top_kernels"]) <= 4
        shares = [kernel["share"] for kernel in row["top_kernels"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        groups = {group["group"]: group for group in row["kernel_groups"]}
        assert abs(sum(group["share"] for group in groups.values()) - 1) < 1e-9
        assert groups["gemm"]["ms"] > 0  # on CPU the matmul ops are grouped by their ATen names
        top_matmuls = [k["ms"] for k in row["top_kernels"] if k["name"] in ("aten::mm", "aten::addmm")]
        assert groups["gemm"]["ms"] >= sum(top_matmuls)  # the top 4 of a CPU profile need not hold one
    table = format_table(result)
    assert "activation_checkpointing True" in table
    assert table.count("-- top kernels") == 3 and table.count("-- device time by kind of kernel") == 3
    for row in result["rows"]:  # each profile says how much of the step its kernels took
        kernel_ms = sum(group["ms"] for group in row["kernel_groups"])
        step_ms = result["tokens_per_step"] / row["tokens_per_s"] * 1e3
        assert f"{kernel_ms:.1f} ms in kernels against a median step of {step_ms:.1f} ms" in table


def test_bench_bf16_weights_row_reports_its_gemm_time():
    result = run_benchmark(batch_size=2, seq_len=32, warmup=1, repeats=1, stages=["stage2"], students=["gdn"],
                           chunk_tokens=16, shape=TINY, stage2_steps=["project"], bf16_weights=True,
                           compile_kl=True, gemm_ceiling=True)
    assert result["options"]["bf16_weights"] is True and result["options"]["compile_kl"] is True
    [row] = result["rows"]
    assert row["tokens_per_s"] > 0 and row["gemm_ms"] > 0
    assert row["mfu_ceiling"] is None  # no matmul rate is measured on a CPU
    header, row_line = format_table(result).splitlines()[2:4]
    assert "step ms issue ms  GEMM ms ceiling" in header
    assert f"{row['gemm_ms']:8.1f}".strip() in row_line
    step_ms = result["tokens_per_step"] / row["tokens_per_s"] * 1e3  # one timed step: issuing it is part of it
    assert 0 < row["issue_ms"] <= step_ms and f"{row['issue_ms']:8.1f}".strip() in row_line


def test_each_compiled_row_starts_from_a_clean_compiler(monkeypatch):
    """Compiled code of earlier rows must not slow later rows of one process: Dynamo is reset before each
    compiled row is built, and only then."""
    from hybrid_distill.distill import bench

    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    real_build = bench.build_objective
    monkeypatch.setattr(bench, "build_objective", lambda *a, **k: events.append("build") or real_build(*a, **k))
    for compile_kl, expected in ((True, ["reset", "build"] * 2), (False, ["build"] * 2)):
        events.clear()
        run_benchmark(batch_size=1, seq_len=16, warmup=0, repeats=1, stages=["stage2"], students=["softmax", "gdn"],
                      chunk_tokens=16, shape=TINY, stage2_steps=["project"], compile_kl=compile_kl)
        assert events == expected


def test_compiled_layers_have_their_kernels_tuned_unless_the_user_said_otherwise(teacher, monkeypatch):
    import torch._inductor.config as inductor_config

    for users_choice, expected in ((None, True), ("0", False)):
        if users_choice is None:
            monkeypatch.delenv(COORDINATE_DESCENT_SWITCH, raising=False)
        else:
            monkeypatch.setenv(COORDINATE_DESCENT_SWITCH, users_choice)
        with inductor_config.patch(coordinate_descent_tuning=False):  # as Inductor read the variable at import
            compile_training_layers(copy.deepcopy(teacher))
            assert inductor_config.coordinate_descent_tuning is expected


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


def test_compiled_mixers_keep_names_and_outputs_and_gradients(teacher):
    torch.manual_seed(0)
    last = teacher.config.num_hidden_layers - 1
    student = build_student(teacher, list(range(last)), "gdn")  # one mixer: compiling it on CPU takes seconds
    reference = build_student(teacher, list(range(last)), "gdn")
    reference.load_state_dict(student.state_dict())
    names = list(student.state_dict())
    assert compile_mixers(student) == 1
    assert list(student.state_dict()) == names
    tokens = torch.randint(0, teacher.config.vocab_size, (2, 12))
    outputs = [model(tokens).logits for model in (student, reference)]
    assert torch.allclose(*outputs, atol=1e-5, rtol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    mixer_grads = [dict(model.model.layers[last].self_attn.named_parameters()) for model in (student, reference)]
    for name, parameter in mixer_grads[0].items():
        assert torch.allclose(parameter.grad, mixer_grads[1][name].grad, atol=1e-5, rtol=1e-4), name


@needs_gloo
def test_bench_under_a_two_process_launch_counts_both_processes_tokens_and_reports_once(tmp_path):
    """What measures the 2-GPU speed-up on a GPU machine, run here with two gloo processes."""
    shape = [f"{key}={value}" for key, value in TINY.items()]
    command = [*two_process_launcher(), "-m", "hybrid_distill.cli", "bench", "--shape", *shape,
               "--batch-size", "2", "--seq-len", "32", "--stages", "stage2", "--students", "gdn",
               "--stage2-steps", "project", "--warmup", "1", "--repeats", "1", "--kl-chunk-tokens", "16",
               "--out", str(tmp_path / "bench.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["processes"], result["tokens_per_step"], result["shape"]["hidden_size"]) == (2, 2 * 2 * 32, 32)
    assert [row["step"] for row in result["rows"]] == ["project"] and result["rows"][0]["tokens_per_s"] > 0
    assert run.stdout.count("x 2 processes") == 1  # one table, from the first process


def test_bench_shape_names_a_bad_key_in_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--shape", "hidden=64"])
    assert "'hidden=64': expected KEY=INTEGER" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["project", "cached"])
def test_a_step_of_micro_batches_updates_the_weights_as_the_whole_batch_does(step, tmp_path):
    """--micro-batches must time the same optimizer step: the token-mean loss of equal parts, averaged, is the
    whole batch's, and a cached teacher's rows follow their part of the batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_distill.distill.bench import BenchSettings, build_objective, cache_batch, read_cached, train_step
    from hybrid_distill.distill.master_weights import adamw_for

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    batch = torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    cache = cache_batch(teacher, batch, tmp_path)
    weights, losses = [], []
    for micro_batches in (1, 2):
        torch.manual_seed(0)
        objective = build_objective("stage2", step, teacher, [], "gdn", BenchSettings(chunk_tokens=16), cache)
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = adamw_for(params, lr=1e-2)
        seen = []
        objective.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (len(args[0]), kwargs.get("teacher_hidden"))), with_kwargs=True)
        cached = read_cached(objective, len(batch), micro_batches, torch.device("cpu"))
        assert len(cached) == (micro_batches if step == "cached" else 0)
        losses.append(train_step(objective, batch, optimizer, cached, torch.device("cpu"),
                                 micro_batches=micro_batches).item())
        weights.append({name: p.detach().clone() for name, p in objective.student.named_parameters()})
        parts = [[0, 1], [2, 3]] if micro_batches == 2 else [[0, 1, 2, 3]]
        assert [size for size, _ in seen] == [len(rows) for rows in parts]
        for (_, hidden), rows in zip(seen, parts):  # each part got its own rows of the cache, or none
            assert (hidden is None) if step == "project" else torch.equal(hidden, cache.rows(rows, "cpu"))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert weights[0].keys() == weights[1].keys()
    for name, weight in weights[0].items():
        torch.testing.assert_close(weights[1][name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_refuses_micro_batches_that_do_not_divide_the_batch():
    with pytest.raises(ValueError, match="micro_batches=2 must be at least 1 and divide batch_size=3"):
        run_benchmark(batch_size=3, seq_len=16, stages=["stage2"], students=["gdn"], shape=TINY, micro_batches=2)


@pytest.mark.parametrize("step", ["project", "cached"])
def test_mfu_with_attention_counts_the_causal_half_of_the_attention_matmuls_torch_counts(step, tmp_path):
    """The attention FLOPs added to 8N are those of the softmax layers only (the student's 3x, the live teacher's
    1x), and per layer the causal half of what torch's FLOP counter sees in an eager attention's matmuls."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_distill.distill.bench import BenchSettings, attention_flops_per_token, build_objective, cache_batch

    seq_len = 16
    config = LlamaConfig(**TINY, attn_implementation="eager")
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    batch = torch.randint(0, TINY["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        teacher(batch)
    full_attention = counter.get_flop_counts()["Global"][torch.ops.aten.bmm] / batch.numel()
    teacher_forward = full_attention * (seq_len + 1) / (2 * seq_len)  # causal: (T + 1) / 2 keys per query
    objective = build_objective("stage2", step, teacher, [1], "gdn", BenchSettings(chunk_tokens=16),
                                cache_batch(teacher, batch, tmp_path) if step == "cached" else None)
    one_layer = teacher_forward / TINY["num_hidden_layers"]
    student = 3 * one_layer  # one softmax layer of two, trained
    expected = student if step == "cached" else student + teacher_forward
    assert attention_flops_per_token(objective, seq_len) == pytest.approx(expected, rel=1e-9)


def test_stage2_rows_report_the_mfu_with_attention_beside_the_mfu(monkeypatch):
    from hybrid_distill.distill import bench

    monkeypatch.setattr(bench, "reference_matmul_rate", lambda device: 1e9)  # a CPU has no reference rate
    objectives = []
    real = bench.attention_flops_per_token
    monkeypatch.setattr(bench, "attention_flops_per_token",
                        lambda objective, seq_len: objectives.append(seq_len) or real(objective, seq_len))
    result = run_benchmark(batch_size=2, seq_len=32, warmup=1, repeats=1, stages=["stage1", "stage2"],
                           students=["gdn"], chunk_tokens=16, shape=TINY, stage2_steps=["project"])
    stage1, stage2 = result["rows"]
    assert stage1["mfu"] > 0 and stage1["mfu_with_attention"] is None  # stage 1 aligns layers: no KL step
    # the all-GDN student has none; the live teacher's two layers, (32 + 1) / 2 keys per query on average
    attention = 2 * 4 * TINY["num_attention_heads"] * TINY["head_dim"] * 33 / 2
    assert objectives == [32]
    assert stage2["mfu_with_attention"] - stage2["mfu"] == pytest.approx(attention * stage2["tokens_per_s"] / 1e9)
    assert f"{stage2['mfu_with_attention'] * 100:7.1f}%" in format_table(result)
