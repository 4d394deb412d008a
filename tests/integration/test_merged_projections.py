"""q/k/v and gate/up as one GEMM each (HD_MERGED_PROJECTIONS=on, in distill.compile_blocks' training forwards): the
same function as HF's separate projections, values and gradients, with the parameters and state dict unchanged;
decoding with a cache keeps HF's forward; other classes are left alone; off by default."""
import copy

import pytest
import torch

from hybrid_distill.distill.maskless_attention import maskless_causal_attention
from hybrid_distill.distill.merged_projections import merge_input_projections
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def merged_on(monkeypatch):
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", "on")


def logits_and_grads(model):
    model.zero_grad(set_to_none=True)
    logits = model(TOKENS, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("maskless", [False, True])
def test_merged_model_computes_hfs_values_and_gradients(family, maskless):
    hf = tiny_teacher(family).train()
    merged = copy.deepcopy(hf)
    assert merge_input_projections(merged) == 2 * hf.config.num_hidden_layers  # every attention and MLP
    assert merged.state_dict().keys() == hf.state_dict().keys()
    with maskless_causal_attention(merged) if maskless else torch.enable_grad():
        logits, grads = logits_and_grads(merged)
    want_logits, want_grads = logits_and_grads(hf)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_hybrid_student_merges_its_softmax_attention_and_every_mlp():
    teacher = tiny_teacher("llama")
    student = build_student(teacher, softmax_layers=[1], mixer="gla")
    want = copy.deepcopy(student)
    assert merge_input_projections(student) == 1 + teacher.config.num_hidden_layers
    torch.testing.assert_close(logits_and_grads(student)[0], logits_and_grads(want)[0], rtol=1e-5, atol=1e-5)


def test_decoding_with_a_cache_keeps_hfs_forward():
    hf = tiny_teacher("qwen2")
    merged = copy.deepcopy(hf)
    merge_input_projections(merged)
    with torch.no_grad():
        first = merged(TOKENS[:, :20], use_cache=True)
        step = merged(TOKENS[:, 20:21], past_key_values=first.past_key_values, use_cache=True).logits
        want_first = hf(TOKENS[:, :20], use_cache=True)
        want_step = hf(TOKENS[:, 20:21], past_key_values=want_first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, want_step, rtol=1e-5, atol=1e-5)


def test_switched_off_or_other_classes_keep_hfs_forwards(monkeypatch):
    model = tiny_teacher("llama")
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", "off")
    assert merge_input_projections(model) == 0
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", "maybe")
    with pytest.raises(ValueError, match="HD_MERGED_PROJECTIONS must be on or off, not 'maybe'"):
        merge_input_projections(model)
    monkeypatch.delenv("HD_MERGED_PROJECTIONS")
    assert merge_input_projections(model) == 0  # off by default
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", "on")
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)  # not a plain linear
    assert merge_input_projections(model) == 2 * model.config.num_hidden_layers - 1
