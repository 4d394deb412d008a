"""The stage objectives on tiny students: what they train, their exact per-layer decomposition, their scores."""
import pytest
import torch

from hybrid_distill.distill.objectives import HeldoutTeacher, HiddenAlignment, LogitDistillation, heldout_kl
from hybrid_distill.distill.trainer import TrainSettings, train
from hybrid_distill.models.student import build_student, decoder_layers, mixers_of, restore_softmax_layers

pytestmark = pytest.mark.integration


class Tokens:
    """A fixed random token stream with the PackedTokens interface."""

    def __init__(self, sequences=16, seq_len=24, seed=0):
        self.tokens = torch.randint(0, 128, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))
        self.num_sequences, self.seq_len = sequences, seq_len

    def batch(self, first, size):
        return self.tokens[[(first + i) % self.num_sequences for i in range(size)]]


SETTINGS = TrainSettings(token_budget=6 * 4 * 24, micro_batch_size=4, lr=3e-3, max_grad_norm=0.5, save_every=3)


def run_stage1(teacher, softmax_layers, out_dir):
    student = build_student(teacher, softmax_layers, "gdn")
    objective = HiddenAlignment(student, teacher)
    train(objective, Tokens(), SETTINGS, out_dir, clip_groups=objective.clip_groups())
    return student


def test_stage1_trains_only_mixers(teacher):
    objective = HiddenAlignment(build_student(teacher, [1], "gdn"), teacher)
    trainable = {name for name, p in objective.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in name for name in trainable)
    assert not any(name.startswith("student.model.layers.1.") for name in trainable)
    assert len(objective.clip_groups()) == 3


def test_stage1_is_layer_local_so_one_swap_stage1_equals_all_linear_stage1(teacher, tmp_path):
    """The exact saving: stage 1 of a one-swap student = the all-linear stage 1 with that layer swapped back."""
    all_linear = run_stage1(teacher, [], tmp_path / "all")
    one_swap = run_stage1(teacher, [2], tmp_path / "swap")
    for i, mixer in mixers_of(one_swap).items():
        reference = mixers_of(all_linear)[i].state_dict()
        assert all(torch.allclose(t, reference[k], atol=1e-6, rtol=0) for k, t in mixer.state_dict().items())
    changed = [not torch.equal(mixers_of(all_linear)[0].q_proj.weight, decoder_layers(teacher)[0].self_attn.q_proj.weight)]
    assert all(changed)  # the comparison above is between trained weights


def test_stage1_lowers_alignment_error(teacher, tmp_path):
    student = build_student(teacher, [], "gdn")
    objective = HiddenAlignment(student, teacher)
    batch = Tokens().batch(0, 8)
    with torch.no_grad():
        before = objective(batch)[0].item()
    train(objective, Tokens(), SETTINGS, tmp_path, clip_groups=objective.clip_groups())
    with torch.no_grad():
        assert objective(batch)[0].item() < before


def test_heldout_kl_is_zero_for_the_teacher_and_drops_with_stage2(teacher, tmp_path):
    data = Tokens(seed=1)
    assert heldout_kl(build_student(teacher, range(4), "gdn"), teacher, data, 4, 2) == pytest.approx(0.0, abs=1e-6)
    student = build_student(teacher, [], "gdn")
    before = heldout_kl(student, teacher, data, 4, 2)
    objective = LogitDistillation(student, teacher, temperature=1.0, chunk_tokens=7)
    train(objective, Tokens(), TrainSettings(token_budget=8 * 4 * 24, micro_batch_size=4, lr=1e-3,
                                             schedule="constant", save_every=8), tmp_path)
    assert heldout_kl(student, teacher, data, 4, 2) < before


def test_a_kept_teacher_runs_the_teachers_body_once_and_scores_as_a_live_one(teacher, tmp_path, request):
    data, student = Tokens(seed=3), build_student(teacher, [1], "gdn")
    calls = []
    hook = teacher.model.register_forward_hook(lambda *args: calls.append(1))
    request.addfinalizer(hook.remove)
    kept = HeldoutTeacher()
    first = heldout_kl(student, teacher, data, 6, 4, kept_teacher=kept)  # batches of 4 and 2 rows
    assert (len(calls), kept.teacher_passes) == (2, 2)
    objective = LogitDistillation(student, teacher, temperature=1.0, chunk_tokens=7)
    train(objective, Tokens(), TrainSettings(token_budget=2 * 4 * 24, micro_batch_size=4, lr=1e-3,
                                             schedule="constant", save_every=8), tmp_path)
    calls.clear()
    trained = heldout_kl(student, teacher, data, 6, 4, kept_teacher=kept)
    assert calls == [] and trained != first  # the student moved, the teacher's rows were reused
    assert trained == heldout_kl(student, teacher, data, 6, 4)  # exactly what a live teacher gives
    heldout_kl(student, teacher, Tokens(seed=4), 6, 4, kept_teacher=kept)  # other rows: the teacher runs again
    assert kept.teacher_passes == 4
    small = HeldoutTeacher(max_bytes=1)  # nothing fits: every score runs the teacher again
    heldout_kl(student, teacher, data, 6, 4, kept_teacher=small)
    heldout_kl(student, teacher, data, 6, 4, kept_teacher=small)
    assert small.teacher_passes == 4 and not small.rows


def test_restoring_a_layer_lowers_the_heldout_kl(teacher):
    data = Tokens(seed=2)
    student = build_student(teacher, [], "gdn")
    before = heldout_kl(student, teacher, data, 4, 2)
    restore_softmax_layers(student, teacher, [0, 1, 2])
    assert heldout_kl(student, teacher, data, 4, 2) < before


def test_attention_only_stage2_freezes_everything_else(teacher):
    objective = LogitDistillation(build_student(teacher, [1], "gla"), teacher, 1.0, 16, trainable="attention")
    trainable = {name for name, p in objective.named_parameters() if p.requires_grad}
    assert any(name.startswith("student.model.layers.1.self_attn") for name in trainable)
    assert all(".self_attn." in name for name in trainable)
