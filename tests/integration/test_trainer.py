"""The training runner on a tiny CPU objective: exact resumption, atomic states, step counts, clipping."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hybrid_distill.distill import atomic
from hybrid_distill.distill.master_weights import MASTER_KEY, cast_weights
from hybrid_distill.distill.trainer import TrainSettings, train
from gloo_launch import needs_gloo, two_process_launcher
from trainer_job import SEQ_LEN, TinyLM, TinyTokens, trainable_weights

pytestmark = pytest.mark.integration

JOB = Path(__file__).with_name("trainer_job.py")
STEPS = 8


def tiny_settings(steps: int = STEPS, micro_batch_size: int = 2, grad_accum: int = 1, **overrides) -> TrainSettings:
    """The settings trainer_job.py uses, so that in-process and subprocess runs are interchangeable."""
    fields = dict(token_budget=steps * micro_batch_size * grad_accum * SEQ_LEN, micro_batch_size=micro_batch_size,
                  grad_accum=grad_accum, lr=3e-2, warmup_steps=2, save_every=2, max_grad_norm=0.5)
    fields.update(overrides)
    return TrainSettings(**fields)


def run(out: Path, settings: TrainSettings | None = None, **kwargs):
    return train(TinyLM(), TinyTokens(), settings or tiny_settings(), out, description="tiny", **kwargs)


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in metric_lines(out)}


def state_names(out: Path) -> list[str]:
    return sorted(path.name for path in (out / "state").iterdir())


def assert_bitwise_equal(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name


def run_job(out: Path, extra_env: dict | None = None, launcher: list[str] | None = None, *args: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **(extra_env or {})}
    env.pop("HD_FAIL_AT_STEP", None)
    command = [*(launcher or [sys.executable]), str(JOB), "--out", str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True, scope="module")
def cpu_accelerator():
    """Keep in-process runs on CPU in fp32 even on a GPU machine, and leave no Accelerate state behind."""
    from accelerate.state import AcceleratorState, GradientState

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        AcceleratorState._reset_state(reset_partial_state=True)
        yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 8-step in-process run: its directory and final trainable weights."""
    out = tmp_path_factory.mktemp("reference")
    return out, trainable_weights(run(out).objective)


@pytest.fixture(scope="module")
def job_reference(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run of trainer_job.py."""
    out = tmp_path_factory.mktemp("job_reference")
    finished = run_job(out)
    assert finished.returncode == 0, finished.stderr
    return out


@pytest.mark.parametrize("kill_env, states_left, resumed_step", [
    # killed right after the state of step 4 is in place
    ("TRAINER_JOB_KILL_AFTER_SAVE", ["step_00000002", "step_00000004"], 4),
    # killed with step 4's state fully staged, record included, but not yet renamed into place
    ("TRAINER_JOB_KILL_DURING_SAVE", [".step_00000004.partial", "step_00000002"], 2),
])
def test_sigkill_and_rerun_is_bitwise_identical(job_reference, tmp_path, kill_env, states_left, resumed_step):
    killed = run_job(tmp_path, {kill_env: "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert state_names(tmp_path) == states_left
    assert all((tmp_path / "state" / name / "trainer_state.json").is_file() for name in states_left)
    rerun = run_job(tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {resumed_step} " in rerun.stderr
    assert_bitwise_equal(load_file(tmp_path / "final.safetensors"), load_file(job_reference / "final.safetensors"))
    assert losses(tmp_path) == losses(job_reference)
    assert [line["step"] for line in metric_lines(tmp_path)] == list(range(1, STEPS + 1))
    assert state_names(tmp_path) == ["step_00000008"]


def test_interrupted_save_never_looks_complete(reference, tmp_path, monkeypatch, caplog):
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(target).name == "step_00000004":
            raise OSError("disk went away")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        run(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    staged = tmp_path / "state" / ".step_00000004.partial"
    assert (staged / "trainer_state.json").is_file()  # staged completely, record included, but never renamed
    assert state_names(tmp_path) == [".step_00000004.partial", "step_00000002"]

    with caplog.at_level(logging.INFO, logger="hybrid_distill.distill.trainer"):
        result = run(tmp_path)
    assert "resumed from step 2 " in caplog.text
    assert result.resumed and result.step == STEPS
    assert_bitwise_equal(trainable_weights(result.objective), reference[1])
    assert losses(tmp_path) == losses(reference[0])
    assert [line["step"] for line in metric_lines(tmp_path)] == list(range(1, STEPS + 1))
    assert state_names(tmp_path) == ["step_00000008"]


def test_token_budget_sets_steps_and_tokens(tmp_path):
    tokens_per_step = 2 * 2 * SEQ_LEN  # micro-batch x grad_accum x 1 process x seq_len
    settings = tiny_settings(grad_accum=2, token_budget=5 * tokens_per_step + tokens_per_step - 1)
    result = run(tmp_path, settings)
    assert (result.step, result.tokens) == (5, 5 * tokens_per_step)
    assert [line["tokens"] for line in metric_lines(tmp_path)] == [step * tokens_per_step for step in range(1, 6)]
    assert result.loss == metric_lines(tmp_path)[-1]["loss"]
    assert result.state_dir == tmp_path / "state" / "step_00000005"
    assert state_names(tmp_path) == ["step_00000005"]
    record = json.loads((result.state_dir / "trainer_state.json").read_text())
    assert (record["step"], record["tokens"], record["next_sequence"]) == (5, 5 * tokens_per_step, 5 * 4)

    with pytest.raises(ValueError, match="token_budget=31 "):
        run(tmp_path / "small", tiny_settings(token_budget=tokens_per_step - 1, grad_accum=2))


def test_rerun_of_finished_job_trains_nothing(reference):
    result = run(reference[0])
    assert result.resumed and result.step == STEPS
    assert_bitwise_equal(trainable_weights(result.objective), reference[1])
    assert len(metric_lines(reference[0])) == STEPS


def raw_gradients(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    objective = TinyLM()
    loss, _ = objective(batch)
    loss.backward()
    return {name: param.grad for name, param in objective.named_parameters() if param.requires_grad}


def group_norm(grads: dict[str, torch.Tensor], names: list[str]) -> float:
    return math.sqrt(sum(grads[name].double().pow(2).sum().item() for name in names))


@pytest.mark.parametrize("per_group", [True, False])
def test_clipping_per_group_or_global(tmp_path, per_group):
    max_norm = 0.05
    groups = [["embed.weight"], ["mix.weight", "mix.bias", "head.weight", "head.bias"]]
    raw = raw_gradients(TinyTokens().batch(0, 2))
    raw_norms = [group_norm(raw, names) for names in groups]
    total = math.hypot(*raw_norms)
    assert min(raw_norms) > 2 * max_norm and max(raw_norms) > 1.5 * min(raw_norms)  # the test can tell them apart

    clipped = {}
    objective = TinyLM()
    names = {id(param): name for name, param in objective.named_parameters()}

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            clipped.update({names[id(param)]: param.grad.clone() for param in group["params"]})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        train(objective, TinyTokens(), tiny_settings(steps=1, max_grad_norm=max_norm), tmp_path,
              clip_groups=groups if per_group else None)
    finally:
        handle.remove()

    for names_in_group, raw_norm in zip(groups, raw_norms):
        scale = max_norm / ((raw_norm if per_group else total) + 1e-6)
        for name in names_in_group:
            torch.testing.assert_close(clipped[name], raw[name] * scale, rtol=1e-5, atol=1e-9)
        expected_norm = max_norm if per_group else max_norm * raw_norm / total
        assert group_norm(clipped, names_in_group) == pytest.approx(expected_norm, rel=1e-5)
    assert metric_lines(tmp_path)[0]["grad_norm"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("clip_groups, message", [
    ([["embed.weight", "nope"]], "'nope'"),
    ([["embed.weight"], ["embed.weight"]], "more than one"),
    ([["embed.weight"]], "leaves 4 trainable"),
    ([["teacher.weight"]], "'teacher.weight'"),
])
def test_bad_clip_groups_are_named(tmp_path, clip_groups, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, clip_groups=clip_groups)


def test_init_state_continues_another_jobs_run(reference, tmp_path, caplog):
    first_round = run(tmp_path / "a", stop_after_step=4)
    assert (first_round.step, first_round.state_dir.name) == (4, "step_00000004")
    assert losses(tmp_path / "a") == {step: loss for step, loss in losses(reference[0]).items() if step <= 4}

    with caplog.at_level(logging.INFO, logger="hybrid_distill.distill.trainer"):
        second_round = run(tmp_path / "b", init_state=first_round.state_dir)
    assert "continuing from step 4 " in caplog.text
    assert not second_round.resumed and second_round.step == STEPS
    assert_bitwise_equal(trainable_weights(second_round.objective), reference[1])
    assert losses(tmp_path / "b") == {step: loss for step, loss in losses(reference[0]).items() if step > 4}

    with pytest.raises(ValueError, match="token_budget"):
        run(tmp_path / "c", tiny_settings(steps=9), init_state=first_round.state_dir)


def test_bf16_weights_resume_from_their_float32_masters(tmp_path):
    def bf16_run(out: Path, **kwargs):
        model = TinyLM()
        cast_weights(model, torch.bfloat16)
        return train(model, TinyTokens(), tiny_settings(), out, description="tiny bf16", **kwargs)

    straight = bf16_run(tmp_path / "straight")
    bf16_run(tmp_path / "resumed", stop_after_step=4)
    saved = torch.load(tmp_path / "resumed" / "state" / "step_00000004" / "optimizer.bin", weights_only=True)
    assert [master.dtype for master in saved[MASTER_KEY]] == [torch.float32] * 5  # embed, mix and head weights
    resumed = bf16_run(tmp_path / "resumed")
    assert resumed.resumed and resumed.step == STEPS
    weights = trainable_weights(resumed.objective)
    assert {weight.dtype for weight in weights.values()} == {torch.bfloat16}
    assert_bitwise_equal(weights, trainable_weights(straight.objective))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_injected_failure_raises_once_then_completes(reference, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HD_FAIL_AT_STEP", "3")
    with pytest.raises(RuntimeError, match=r"injected failure at step 3 \(HD_FAIL_AT_STEP\)"):
        run(tmp_path)
    assert (tmp_path / ".failed_once").exists()
    assert [line["step"] for line in metric_lines(tmp_path)] == [1, 2, 3]

    with caplog.at_level(logging.INFO, logger="hybrid_distill.distill.trainer"):
        result = run(tmp_path)
    assert "resumed from step 2 " in caplog.text
    assert_bitwise_equal(trainable_weights(result.objective), reference[1])
    assert losses(tmp_path) == losses(reference[0])
    assert [line["step"] for line in metric_lines(tmp_path)] == list(range(1, STEPS + 1))


@needs_gloo
def test_two_processes_match_one_with_twice_the_micro_batch(tmp_path):
    launcher = two_process_launcher()
    common = ["--steps", "3", "--grad-accum", "2", "--save-every", "2"]
    two = run_job(tmp_path / "two", None, launcher, *common, "--micro-batch", "1")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_job(tmp_path / "one", None, None, *common, "--micro-batch", "2")
    assert one.returncode == 0, one.stderr

    assert sorted(os.listdir(tmp_path / "two" / "state" / "step_00000003")) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
        "trainer_state.json"]
    two_weights, one_weights = load_file(tmp_path / "two" / "final.safetensors"), load_file(
        tmp_path / "one" / "final.safetensors")
    assert two_weights.keys() == one_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=1e-5)
    two_lines, one_lines = metric_lines(tmp_path / "two"), metric_lines(tmp_path / "one")
    assert [(line["step"], line["tokens"], line["lr"]) for line in two_lines] == [
        (line["step"], line["tokens"], line["lr"]) for line in one_lines]
    for two_line, one_line in zip(two_lines, one_lines):
        assert two_line["loss"] == pytest.approx(one_line["loss"], abs=1e-5)
        assert two_line["grad_norm"] == pytest.approx(one_line["grad_norm"], abs=1e-5)


def test_grad_accum_matches_a_larger_micro_batch(tmp_path):
    accumulated = run(tmp_path / "accumulated", tiny_settings(steps=3, micro_batch_size=1, grad_accum=2))
    whole = run(tmp_path / "whole", tiny_settings(steps=3, micro_batch_size=2))
    for name, weight in trainable_weights(whole.objective).items():
        torch.testing.assert_close(trainable_weights(accumulated.objective)[name], weight, rtol=0, atol=1e-6)
    for accumulated_line, whole_line in zip(metric_lines(tmp_path / "accumulated"), metric_lines(tmp_path / "whole")):
        assert accumulated_line["loss"] == pytest.approx(whole_line["loss"], abs=1e-6)
        assert accumulated_line["grad_norm"] == pytest.approx(whole_line["grad_norm"], abs=1e-6)  # Adam hides scale


def test_cuda_graphs_on_a_cpu_run_train_eagerly_and_identically(reference, tmp_path):
    """distill.cuda_graphs applies on GPUs only: a CPU job with it on is the same job, bit for bit."""
    out, weights = reference
    graphs_on = run(tmp_path / "graphs", cuda_graphs=True)
    assert_bitwise_equal(trainable_weights(graphs_on.objective), weights)
    assert metric_lines(tmp_path / "graphs") == [
        {**line, "tokens_per_s": graphed["tokens_per_s"]}
        for line, graphed in zip(metric_lines(out), metric_lines(tmp_path / "graphs"), strict=True)]
