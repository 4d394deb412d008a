"""HD_PACKED_DECODE: a decode token's q/k/v (with a mixer's gates) and gate/up each run as one GEMV on weights packed
once, in teachers and hybrids alike; names, values, prefill and training stay HF's."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_distill.evaluate.packed_projections import pack_decode_projections
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder
from hybrid_distill.models.packed_inputs import PACKED_WEIGHT
from hybrid_distill.models.student import build_student
from tiny_models import tiny_teacher

PROMPT = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def model_of(kind):
    if kind == "hybrid":
        return build_student(tiny_teacher("llama"), softmax_layers=[1], mixer="gdn").eval()
    return tiny_teacher(kind)


class GemmCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func.overloadpacket.__name__ in ("mm", "addmm")
        return func(*args, **(kwargs or {}))


def gemms_in_a_decode_step(model, packed: bool, monkeypatch) -> tuple[int, torch.Tensor]:
    monkeypatch.setenv("HD_PACKED_DECODE", "on" if packed else "off")
    decoder = StaticGreedyDecoder.after_prefill(model, PROMPT, 3)
    decoder.step()
    with GemmCounter() as counter:
        decoder.step()
    decoder.step()
    return counter.gemms, decoder.tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2", "hybrid"])
def test_a_decode_step_runs_one_gemv_per_group_and_the_same_tokens(kind, monkeypatch):
    """Per layer: q, k and v (a GDN mixer's with its a and b gates) 3 GEMMs -> 1, gate and up 2 -> 1."""
    plain = model_of(kind)
    packed = copy.deepcopy(plain)
    plain_gemms, plain_tokens = gemms_in_a_decode_step(plain, False, monkeypatch)
    packed_gemms, packed_tokens = gemms_in_a_decode_step(packed, True, monkeypatch)
    assert plain_gemms - packed_gemms == 3 * plain.config.num_hidden_layers
    assert torch.equal(packed_tokens, plain_tokens)


@pytest.mark.parametrize("kind", ["qwen2", "hybrid"])
def test_packing_keeps_names_values_and_training(kind):
    """The weights become views into the packed tensor; autograd, prefill and the state dict see HF's modules."""
    model = model_of(kind).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = copy.deepcopy(model)
    assert pack_decode_projections(model) == 2 * model.config.num_hidden_layers
    assert {name: tensor for name, tensor in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == getattr(mlp, PACKED_WEIGHT).data_ptr()
    for trained in (model, reference):
        trained(PROMPT, use_cache=False).logits.square().mean().backward()
    for (name, param), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, want.grad, msg=name)


def test_a_cast_model_is_packed_again(monkeypatch):
    model = model_of("hybrid")
    pack_decode_projections(model)
    model.double()   # every parameter gets new storage: the packed buffer no longer backs them
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() != getattr(mlp, PACKED_WEIGHT).data_ptr()
    _, tokens = gemms_in_a_decode_step(model, True, monkeypatch)
    assert mlp.gate_proj.weight.data_ptr() == getattr(mlp, PACKED_WEIGHT).data_ptr()
    assert getattr(mlp, PACKED_WEIGHT).dtype == torch.float64
    model.float()
    assert torch.equal(tokens, gemms_in_a_decode_step(copy.deepcopy(model), False, monkeypatch)[1])


def test_bad_switch_is_refused(monkeypatch):
    monkeypatch.setenv("HD_PACKED_DECODE", "yes")
    with pytest.raises(ValueError, match="HD_PACKED_DECODE must be on or off, not 'yes'"):
        StaticGreedyDecoder.after_prefill(model_of("llama"), PROMPT, 2)
