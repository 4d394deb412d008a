"""HD_SDPA picks which fused attention kernels SDPA may use, process-wide; auto leaves PyTorch's choice."""
import pytest
import torch

from hybrid_distill.distill.attention_backend import apply_sdpa_choice

FLAGS = ("cudnn_sdp", "flash_sdp", "mem_efficient_sdp", "math_sdp")


@pytest.fixture
def restored_flags():
    before = {flag: getattr(torch.backends.cuda, f"{flag}_enabled")() for flag in FLAGS}
    tag = torch.compiler.config.cache_key_tag
    yield
    for flag, enabled in before.items():
        getattr(torch.backends.cuda, f"enable_{flag}")(enabled)
    torch.compiler.config.cache_key_tag = tag


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
    torch.compiler.config.cache_key_tag = ""
    assert apply_sdpa_choice() == "auto"
    assert enabled() == before
    assert torch.compiler.config.cache_key_tag == ""
    monkeypatch.setenv("HD_SDPA", "fa3")
    with pytest.raises(ValueError, match="HD_SDPA must be one of auto, cudnn, flash, efficient, not 'fa3'"):
        apply_sdpa_choice()


def test_a_named_choice_keys_the_compile_caches_once_and_keeps_other_tags(restored_flags, monkeypatch):
    """torch's compile caches leave the SDPA flags out of their keys: without the tag a flash process reused a
    cuDNN graph compiled by an earlier process (session 29, H100)."""
    torch.compiler.config.cache_key_tag = "users-own"
    monkeypatch.setenv("HD_SDPA", "flash")
    apply_sdpa_choice()
    apply_sdpa_choice()
    assert torch.compiler.config.cache_key_tag == "users-own,hd_sdpa=flash"
    monkeypatch.setenv("HD_SDPA", "cudnn")
    apply_sdpa_choice()
    assert torch.compiler.config.cache_key_tag == "users-own,hd_sdpa=cudnn"
