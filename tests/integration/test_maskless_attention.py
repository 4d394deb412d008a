"""Training forwards skip HF's mask building (a host-GPU sync on CUDA) and compute exactly the same thing."""
import contextlib

import pytest
import torch
import transformers.masking_utils

from hybrid_distill.distill.maskless_attention import maskless_causal_attention
from hybrid_distill.distill.objectives import LogitDistillation
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher


@pytest.fixture
def mask_building_fails(monkeypatch):
    """HF's packed-sequence check (the step that reads position ids on the host) raises if it runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("HF built an attention mask")
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", refuse)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_logits_and_no_mask_building_inside_the_block(family, mask_building_fails, monkeypatch):
    model = tiny_teacher(family)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with maskless_causal_attention(model):
        inside = model(tokens, use_cache=False).logits
    assert model.config._attn_implementation == "sdpa"  # restored
    with pytest.raises(AssertionError, match="built an attention mask"):
        model(tokens, use_cache=False)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda *args, **kwargs: None)
    assert torch.equal(inside, model(tokens, use_cache=False).logits)


def test_sliding_window_models_keep_their_mask():
    model = tiny_teacher("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with maskless_causal_attention(model):
        assert model.config._attn_implementation == "sdpa"


def test_the_implementation_is_restored_when_the_forward_raises():
    model = tiny_teacher("llama")
    with pytest.raises(RuntimeError), maskless_causal_attention(model):
        raise RuntimeError("a failing step")
    assert model.config._attn_implementation == "sdpa"


def test_stage2_loss_and_gradients_are_unchanged_and_build_no_mask(monkeypatch):
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [1], "gdn")
    objective = LogitDistillation(student, teacher, temperature=2.0, chunk_tokens=16)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        student.zero_grad(set_to_none=True)
        loss, _ = objective(tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters() if p.requires_grad]

    calls = []
    original = transformers.masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    loss, grads = loss_and_grads()
    assert calls == []
    with monkeypatch.context() as patch:  # HF's own path: mask building runs, and the numbers are the same
        patch.setattr("hybrid_distill.distill.objectives.maskless_causal_attention",
                      lambda *models: contextlib.nullcontext())
        reference_loss, reference_grads = loss_and_grads()
    assert len(calls) == 2  # teacher and student forwards
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))
