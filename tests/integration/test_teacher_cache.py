"""The stage-2 teacher cache on a tiny random Llama: exact against the live teacher, falls back outside its rows,
and refuses a cache of another teacher, stream, precision or size."""
import json

import numpy as np
import pytest
import torch

from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill.jobs import cache_identity, open_teacher_cache
from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.distill.teacher_cache import TeacherCacheError, write_teacher_cache
from hybrid_distill.distill.trainer import TrainSettings, train
from hybrid_distill.errors import USER_ERRORS
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

pytestmark = pytest.mark.integration

SEQ_LEN, MICRO_BATCH = 16, 2


def make_stream(directory, sequences=6, seq_len=SEQ_LEN, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 128, (sequences, seq_len))
    write_packed(directory / "train.bin", tokens, {"vocab_size": 128})
    return PackedTokens(directory / "train.bin")


def make_teacher(directory, seed=0):
    teacher = tiny_teacher("llama", seed=seed)
    teacher.save_pretrained(directory)
    return teacher


@pytest.fixture
def run(tmp_path):
    """(teacher, its directory, the training stream, a cache of its first 4 rows) of one tiny run."""
    teacher = make_teacher(tmp_path / "teacher")
    data = make_stream(tmp_path)
    path = tmp_path / "cache" / "train_hidden.bin"
    write_teacher_cache(teacher, data, 4, MICRO_BATCH, path, autocast_dtype=None,
                        identity=cache_identity(tmp_path / "teacher", teacher, data))
    return teacher, tmp_path / "teacher", data, path


def stage2(teacher, cache=None, seed=0):
    torch.manual_seed(seed)
    return LogitDistillation(build_student(teacher, [1], "gla"), teacher, 1.0, 7, teacher_cache=cache)


def with_rows(objective, input_ids, indices):
    """A step on the batch of data rows `indices`, reading what the cache holds for them as the trainer does."""
    return objective(input_ids, **objective.cached_inputs(indices, input_ids.device))


def loss_and_grads(objective, input_ids, indices):
    loss, metrics = with_rows(objective, input_ids, indices)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.requires_grad}
    return loss.detach(), grads, metrics


def test_cached_loss_and_gradients_equal_the_live_teacher(run):
    teacher, teacher_dir, data, path = run
    cache = open_teacher_cache(path, teacher_dir, teacher, data)
    live_loss, live_grads, live_metrics = loss_and_grads(stage2(teacher), data.batch(2, 2), [2, 3])
    loss, grads, metrics = loss_and_grads(stage2(teacher, cache), data.batch(2, 2), [2, 3])
    assert metrics == {"teacher_cached": 1.0} and live_metrics == {}
    assert torch.equal(loss, live_loss)
    assert grads.keys() == live_grads.keys() and all(torch.equal(grads[k], live_grads[k]) for k in grads)


def test_a_cache_read_at_the_wrong_rows_changes_the_loss(run):
    """The equality above is not vacuous: rows shifted by one give another loss."""
    teacher, teacher_dir, data, path = run
    cache = open_teacher_cache(path, teacher_dir, teacher, data)
    live_loss, _, _ = loss_and_grads(stage2(teacher), data.batch(2, 2), [2, 3])
    shifted_loss, _, _ = loss_and_grads(stage2(teacher, cache), data.batch(2, 2), [1, 2])
    assert abs(shifted_loss.item() - live_loss.item()) > 1e-3


def test_a_batch_partly_outside_the_cache_runs_the_live_teacher(run):
    teacher, teacher_dir, data, path = run
    cache = open_teacher_cache(path, teacher_dir, teacher, data)
    live_loss, _, _ = loss_and_grads(stage2(teacher), data.batch(3, 2), [3, 4])
    loss, _, metrics = loss_and_grads(stage2(teacher, cache), data.batch(3, 2), [3, 4])
    assert metrics == {"teacher_cached": 0.0} and torch.equal(loss, live_loss)


def test_training_with_the_cache_equals_training_with_the_live_teacher(run, tmp_path):
    """Through the trainer: 4 steps of 2 rows over 6 rows read rows 0-3 cached, 4-5 live, then wrap to 0-1."""
    teacher, teacher_dir, data, path = run
    settings = TrainSettings(token_budget=4 * MICRO_BATCH * SEQ_LEN, micro_batch_size=MICRO_BATCH, lr=1e-3,
                             schedule="constant", save_every=4)
    cached = stage2(teacher, open_teacher_cache(path, teacher_dir, teacher, data))
    live = stage2(teacher)
    train(cached, data, settings, tmp_path / "cached")
    train(live, data, settings, tmp_path / "live")
    weights = {k: v for k, v in cached.student.state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in live.student.state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [line["teacher_cached"] for line in lines] == [1.0, 1.0, 0.0, 1.0]


def test_bf16_autocast_cache_is_stored_in_bf16_and_exact_under_the_same_autocast(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    data = make_stream(tmp_path)
    path = tmp_path / "train_hidden.bin"
    meta = write_teacher_cache(teacher, data, 2, MICRO_BATCH, path, autocast_dtype=torch.bfloat16,
                               identity=cache_identity(tmp_path / "teacher", teacher, data))
    assert meta["dtype"] == "bfloat16" and path.stat().st_size == 2 * SEQ_LEN * 64 * 2
    cache = open_teacher_cache(path, tmp_path / "teacher", teacher, data)
    # Loss only: CPU autocast leaves log_softmax in bf16, which the KL's gradient path does not take (CUDA's does).
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        live_loss, _ = with_rows(stage2(teacher), data.batch(0, 2), [0, 1])
        loss, metrics = with_rows(stage2(teacher, cache), data.batch(0, 2), [0, 1])
        shifted_loss, _ = with_rows(stage2(teacher, cache), data.batch(0, 2), [1, 0])
    assert metrics == {"teacher_cached": 1.0} and torch.equal(loss, live_loss) and shifted_loss != live_loss
    with pytest.raises(TeacherCacheError, match="autocast bfloat16, read on cpu with autocast None"):
        with_rows(stage2(teacher, cache), data.batch(0, 2), [0, 1])


def assert_one_line_naming(error, path):
    assert isinstance(error.value, USER_ERRORS)  # the CLI prints it as one line, no traceback
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_cache_of_another_teacher_is_refused(run, tmp_path):
    _, _, data, path = run
    other = make_teacher(tmp_path / "other", seed=1)
    with pytest.raises(TeacherCacheError, match="stale teacher cache: teacher_fingerprint") as error:
        open_teacher_cache(path, tmp_path / "other", other, data)
    assert_one_line_naming(error, path)


def test_a_cache_of_another_stream_or_seq_len_is_refused(run, tmp_path):
    teacher, teacher_dir, _, path = run
    longer = make_stream(tmp_path / "longer", seq_len=2 * SEQ_LEN)
    with pytest.raises(TeacherCacheError, match="stale teacher cache: data_sha256") as error:
        open_teacher_cache(path, teacher_dir, teacher, longer)
    assert_one_line_naming(error, path)
    expected = {**cache_identity(teacher_dir, teacher, longer), "data_sha256": json.loads(
        path.with_suffix(".json").read_text())["data_sha256"]}
    with pytest.raises(TeacherCacheError, match="stale teacher cache: seq_len is 16, this job has 32"):
        from hybrid_distill.distill.teacher_cache import TeacherCache
        TeacherCache(path, expected)


def test_a_truncated_or_unfinished_cache_is_refused(run):
    teacher, teacher_dir, data, path = run
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 2)
    with pytest.raises(TeacherCacheError, match="truncated or stale") as error:
        open_teacher_cache(path, teacher_dir, teacher, data)
    assert_one_line_naming(error, path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(TeacherCacheError, match="not valid JSON"):
        open_teacher_cache(path, teacher_dir, teacher, data)
    path.with_suffix(".json").unlink()
    with pytest.raises(TeacherCacheError, match="sidecar missing"):
        open_teacher_cache(path, teacher_dir, teacher, data)
