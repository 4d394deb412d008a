"""HD_SDPA picks which fused attention kernels SDPA may use, process-wide; auto leaves PyTorch's choice."""
import pytest
import torch

from hybrid_distill.distill.attention_backend import apply_sdpa_choice

FLAGS = ("cudnn_sdp", "flash_sdp", "mem_efficient_sdp", "math_sdp")


@pytest.fixture
def restored_flags():
    before = {flag: getattr(torch.backends.cuda, f"{flag}_enabled")() for flag in FLAGS}
    yield
    for flag, enabled in before.items():
        getattr(torch.backends.cuda, f"enable_{flag}")(enabled)


def enabled():
    return {flag: getattr(torch.backends.cuda, f"{flag}_enabled")() for flag in FLAGS}


@pytest.mark.parametrize("choice, only", [("flash", "flash_sdp"), ("cudnn", "cudnn_sdp"),
                                          ("efficient", "mem_efficient_sdp")])
def test_a_named_kernel_is_the_only_fused_one_left(choice, only, restored_flags, monkeypatch):
    monkeypatch.setenv("HD_SDPA", choice)
    assert apply_sdpa_choice() == choice
    assert enabled() == {flag: flag in (only, "math_sdp") for flag in FLAGS}


def test_auto_leaves_pytorchs_choice_and_bad_values_are_refused(restored_flags, monkeypatch):
    before = enabled()
    monkeypatch.delenv("HD_SDPA", raising=False)
    assert apply_sdpa_choice() == "auto"
    assert enabled() == before
    monkeypatch.setenv("HD_SDPA", "fa3")
    with pytest.raises(ValueError, match="HD_SDPA must be one of auto, cudnn, flash, efficient, not 'fa3'"):
        apply_sdpa_choice()
