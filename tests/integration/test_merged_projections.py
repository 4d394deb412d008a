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


@pytest.fixture(autouse=True, params=["on", "forward"])
def merged_on(request, monkeypatch):
    """Every test runs under both merged choices: one GEMM forward and backward, and one GEMM forward only."""
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", request.param)
    return request.param


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
    with pytest.raises(ValueError, match="HD_MERGED_PROJECTIONS must be on, forward or off, not 'maybe'"):
        merge_input_projections(model)
    monkeypatch.delenv("HD_MERGED_PROJECTIONS")
    assert merge_input_projections(model) == 0  # off by default
    monkeypatch.setenv("HD_MERGED_PROJECTIONS", "on")
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)  # not a plain linear
    assert merge_input_projections(model) == 2 * model.config.num_hidden_layers - 1


def backward_ops(model) -> list[str]:
    """The ATen ops the backward of a training forward runs, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    loss = model(TOKENS, use_cache=False).logits.float().square().mean()
    with Recorder() as recorder:
        loss.backward()
    return recorder.ops


def test_forward_only_merging_concatenates_no_gradient_and_sums_the_inputs_gradient_in_its_gemms(merged_on):
    """`on` concatenates q, k and v's gradients (and gate's and up's) for one backward GEMM; Inductor fused that cat
    into a kernel that cost more than the GEMM saved. `forward` runs each projection's gradient GEMMs alone and adds
    each input-gradient term in its GEMM, in place (`accumulate_mm`), where HF's separate layout adds GEMM outputs in
    kernels of their own. An out-of-place addmm would first copy the running sum into its output (session 30: 98
    copies per step on an H100)."""
    merged = tiny_teacher("llama").train()
    merge_input_projections(merged)
    ops = backward_ops(merged)
    layers = merged.config.num_hidden_layers
    if merged_on == "on":
        assert ops.count("cat") >= 2 * layers
    else:
        assert "cat" not in ops
        assert ops.count("accumulate_mm") == (2 + 1) * layers  # k's and v's terms, then up's
        assert "addmm" not in ops


def test_merged_models_train_under_autocast_and_compiled_as_hfs_does(merged_on):
    """bf16 autocast, as a training step runs on GPU: the casts F.linear would make are made before the merged
    GEMM, gradients reach the float32 parameters in their dtype; compiled layers (Inductor on CPU) give the same."""
    from hybrid_distill.distill.compiled_blocks import compile_training_layers
    hf = tiny_teacher("qwen2").train()
    merged = copy.deepcopy(hf)
    merge_input_projections(merged)
    compiled = copy.deepcopy(merged)
    compile_training_layers(compiled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_logits, want_grads = logits_and_grads(hf)
        for model in (merged, compiled):
            logits, grads = logits_and_grads(model)
            torch.testing.assert_close(logits.float(), want_logits.float(), rtol=2e-2, atol=2e-2)
            for name, grad in grads.items():
                assert grad.dtype == torch.float32, name
                torch.testing.assert_close(grad, want_grads[name], rtol=5e-2, atol=2e-3, msg=name)
