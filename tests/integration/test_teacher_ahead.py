"""distill.teacher_ahead on a tiny random Llama, through the trainer: the teacher one micro-batch ahead trains
exactly as the teacher in line, runs once per micro-step plus once, and refuses states computed on other rows."""
import copy
import json

import numpy as np
import pytest
import torch

from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill import objectives
from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.distill.teacher_ahead import PRIORITY_SWITCH, student_stream_priority
from hybrid_distill.distill.trainer import TrainSettings, train
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

pytestmark = pytest.mark.integration

SEQ_LEN, MICRO_BATCH, GRAD_ACCUM, STEPS = 16, 2, 2, 3


@pytest.fixture(autouse=True)
def cpu_accelerator(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stream(directory, sequences=10):
    """10 rows, read 4 per step: the third step wraps around, so the teacher's next rows wrap as the data's do."""
    tokens = np.random.default_rng(0).integers(0, 128, (sequences, SEQ_LEN))
    write_packed(directory / "train.bin", tokens, {"vocab_size": 128})
    return PackedTokens(directory / "train.bin")


def teacher_runs(monkeypatch) -> list[torch.Tensor]:
    """The ids of every call of the teacher's body, in order."""
    calls = []
    real = objectives.teacher_final_hidden
    monkeypatch.setattr(objectives, "teacher_final_hidden",
                        lambda teacher, ids: calls.append(ids.clone()) or real(teacher, ids))
    return calls


def test_the_teacher_ahead_trains_exactly_as_the_teacher_in_line(tmp_path, monkeypatch):
    """Grad accumulation 2 over 3 steps: each micro-step's teacher states were computed by the micro-step before
    (the first job step's in line), and the last ran the teacher on the rows after the job's."""
    teacher = tiny_teacher("llama")
    data = stream(tmp_path)
    student = build_student(teacher, [0], "gdn")
    settings = TrainSettings(token_budget=STEPS * GRAD_ACCUM * MICRO_BATCH * SEQ_LEN, micro_batch_size=MICRO_BATCH,
                             grad_accum=GRAD_ACCUM, lr=1e-2, schedule="constant", save_every=STEPS)
    results, runs = {}, {}
    calls = teacher_runs(monkeypatch)
    for ahead in (False, True):
        calls.clear()
        objective = LogitDistillation(copy.deepcopy(student), teacher, 1.0, 8, teacher_ahead=ahead)
        assert objective.reads_following_ids is ahead
        train(objective, data, settings, tmp_path / str(ahead))
        results[ahead] = objective.student.state_dict()
        runs[ahead] = list(calls)
    in_line = [data.batch(first, MICRO_BATCH) for first in range(0, STEPS * GRAD_ACCUM * MICRO_BATCH, MICRO_BATCH)]
    assert [ids.tolist() for ids in runs[False]] == [ids.tolist() for ids in in_line]
    after = data.batch(STEPS * GRAD_ACCUM * MICRO_BATCH, MICRO_BATCH)
    assert [ids.tolist() for ids in runs[True]] == [ids.tolist() for ids in in_line + [after]]
    assert all(torch.equal(results[True][name], weight) for name, weight in results[False].items())
    logged = {ahead: [json.loads(line)["loss"] for line in (tmp_path / str(ahead) / "metrics.jsonl").open()]
              for ahead in (False, True)}
    assert logged[True] == logged[False] and len(set(logged[False])) == STEPS


def test_states_computed_on_other_rows_are_refused():
    teacher = tiny_teacher("llama")
    objective = LogitDistillation(build_student(teacher, [0], "gdn"), teacher, 1.0, 8, teacher_ahead=True)
    rows = torch.randint(0, 128, (3, 2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    objective(rows[0], following_ids=rows[1])
    objective(rows[1], following_ids=rows[2])
    with pytest.raises(RuntimeError, match="teacher_ahead: the teacher ran ahead on other rows"):
        objective(rows[1], following_ids=rows[2])


def test_following_ids_go_with_the_teacher_ahead_only(tmp_path):
    teacher = tiny_teacher("llama")
    rows = torch.randint(0, 128, (2, 2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    in_line = LogitDistillation(build_student(teacher, [0], "gdn"), teacher, 1.0, 8)
    with pytest.raises(ValueError, match="following_ids goes with teacher_ahead"):
        in_line(rows[0], following_ids=rows[1])
    ahead = LogitDistillation(build_student(teacher, [0], "gdn"), teacher, 1.0, 8, teacher_ahead=True)
    with pytest.raises(ValueError, match="following_ids goes with teacher_ahead"):
        ahead(rows[0])
    with_cache = LogitDistillation(build_student(teacher, [0], "gdn"), teacher, 1.0, 8, teacher_cache=object(),
                                   teacher_ahead=True)
    assert not with_cache.reads_following_ids  # a cache replaces the teacher's body; nothing runs ahead


def test_the_priority_switch_names_itself(monkeypatch):
    monkeypatch.delenv(PRIORITY_SWITCH, raising=False)
    assert student_stream_priority() < 0
    monkeypatch.setenv(PRIORITY_SWITCH, "equal")
    assert student_stream_priority() == 0
    monkeypatch.setenv(PRIORITY_SWITCH, "high")
    with pytest.raises(ValueError, match=PRIORITY_SWITCH):
        student_stream_priority()
