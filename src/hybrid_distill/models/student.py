"""Build hybrid students: the teacher with every attention outside `softmax_layers` swapped for a linear mixer.

Weight transfer follows RADLADS: the mixer's q/k/v/o projections start as the teacher's W_Q/W_K/W_V/W_O (KV
heads repeated to the query head count under GQA, Qwen2 biases carried over); the rest is fresh (see mixers).
Linear layers use no rotary embedding: their position signal comes from decays and the short convolution.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .mixers import MIXER_KINDS, LinearMixer, MixerSpec, make_mixer

HYBRID_CONFIG_KEY = "hybrid"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mixer_spec_for(config, kind: str, **options) -> MixerSpec:
    """A mixer whose heads mirror the teacher's query heads (head_dim from the teacher)."""
    if kind not in MIXER_KINDS:
        raise ValueError(f"unknown mixer {kind!r}; supported: {', '.join(MIXER_KINDS)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
    return MixerSpec(kind=kind, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                     head_dim=head_dim, qkv_bias=qkv_bias, norm_eps=config.rms_norm_eps, **options)


def check_layer_indices(layers, total: int, name: str = "softmax_layers") -> list[int]:
    indices = sorted({int(i) for i in layers})
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise ValueError(f"{name}: layer index {bad[0]} is out of range for a {total}-layer model (0..{total - 1})")
    return indices


def _repeat_kv_rows(weight: torch.Tensor, kv_heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Repeat each KV head's rows `groups` times, in the order HF's repeat_kv pairs them with query heads."""
    if weight.dim() == 1:
        return weight.reshape(kv_heads, head_dim).repeat_interleave(groups, dim=0).reshape(-1)
    return weight.reshape(kv_heads, head_dim, -1).repeat_interleave(groups, dim=0).reshape(kv_heads * groups * head_dim, -1)


@torch.no_grad()
def transfer_attention_weights(attention: nn.Module, mixer: LinearMixer, config) -> None:
    """Copy W_Q, W_K, W_V, W_O (and q/k/v biases) from a HF attention module into a fresh mixer."""
    spec = mixer.spec
    kv_heads = config.num_key_value_heads
    groups = spec.num_heads // kv_heads
    mixer.q_proj.weight.copy_(attention.q_proj.weight)
    mixer.k_proj.weight.copy_(_repeat_kv_rows(attention.k_proj.weight, kv_heads, groups, spec.head_dim))
    mixer.v_proj.weight.copy_(_repeat_kv_rows(attention.v_proj.weight, kv_heads, groups, spec.head_dim))
    mixer.o_proj.weight.copy_(attention.o_proj.weight)
    if spec.qkv_bias:
        for name in ("q_proj", "k_proj", "v_proj"):
            source = getattr(attention, name).bias
            target = getattr(mixer, name).bias
            if source is None:
                target.zero_()
            elif name == "q_proj":
                target.copy_(source)
            else:
                target.copy_(_repeat_kv_rows(source, kv_heads, groups, spec.head_dim))


def mixers_of(model: nn.Module) -> dict[int, LinearMixer]:
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer.self_attn, LinearMixer)}


def softmax_layers_of(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if not isinstance(layer.self_attn, LinearMixer)]


def _share_padding_mask(module, args, kwargs):
    """Hand the 2-D padding mask to every mixer: HF passes attention modules only the 4-D causal mask."""
    mask = kwargs.get("attention_mask")
    for mixer in module._hybrid_mixers:
        mixer.padding_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def record_hybrid_config(model: nn.Module, spec: MixerSpec | None) -> None:
    """Write the `hybrid` section of config.json and (re)attach the padding hook."""
    base = model.model
    base._hybrid_mixers = list(mixers_of(model).values())
    if not getattr(base, "_hybrid_hook_attached", False):
        base.register_forward_pre_hook(_share_padding_mask, with_kwargs=True)
        base._hybrid_hook_attached = True
    section = {"softmax_layers": softmax_layers_of(model), "mixer": spec.to_dict() if spec else None}
    setattr(model.config, HYBRID_CONFIG_KEY, section)


def replace_with_mixers(model: nn.Module, layer_indices, spec: MixerSpec) -> None:
    """Put freshly initialised mixers (same dtype/device as the layer) in the given layers, without transfer."""
    for i in layer_indices:
        layer = decoder_layers(model)[i]
        reference = next(layer.parameters())
        layer.self_attn = make_mixer(spec, i).to(dtype=reference.dtype, device=reference.device)


def build_student(teacher: nn.Module, softmax_layers, mixer: str | MixerSpec = "gdn", **mixer_options) -> nn.Module:
    """A trainable copy of `teacher` with linear mixers everywhere except `softmax_layers`."""
    total = num_layers(teacher)
    keep = set(check_layer_indices(softmax_layers, total))
    spec = mixer if isinstance(mixer, MixerSpec) else mixer_spec_for(teacher.config, mixer, **mixer_options)
    student = copy.deepcopy(teacher)
    linear = [i for i in range(total) if i not in keep]
    replace_with_mixers(student, linear, spec)
    for i in linear:
        transfer_attention_weights(decoder_layers(teacher)[i].self_attn, decoder_layers(student)[i].self_attn,
                                   teacher.config)
    record_hybrid_config(student, spec if linear else None)
    return student.requires_grad_(True)


def mixer_spec_of(model: nn.Module) -> MixerSpec | None:
    section = getattr(model.config, HYBRID_CONFIG_KEY, None) or {}
    return MixerSpec(**section["mixer"]) if section.get("mixer") else None


@torch.no_grad()
def restore_softmax_layers(student: nn.Module, teacher: nn.Module, layers) -> None:
    """Give the listed layers back the teacher's softmax attention, bit for bit (one-swap and final hybrids)."""
    for i in check_layer_indices(layers, num_layers(student), "layers"):
        source = decoder_layers(teacher)[i].self_attn
        restored = copy.deepcopy(source).requires_grad_(True)
        decoder_layers(student)[i].self_attn = restored
    record_hybrid_config(student, mixer_spec_of(student))
