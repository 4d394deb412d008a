"""One GEMV per decode token for the projections that read the same input: a softmax attention's q, k and v, a
linear mixer's q, k, v and gates, an MLP's gate and up; for the teacher and the hybrid alike.

Why: a graphed decode step at SmolLM2 shapes is a few hundred small kernels, each costing a few microseconds
whatever its size (session 6's profile: 210 small GEMMs, 0.76 ms of the hybrid's 2.68 ms step). Concatenating the
weights at every token would copy each weight once more, so they are packed once instead: each projection's weight
(and bias) becomes a view into one packed tensor, held by its module as a non-persistent buffer, and a one-token
forward without autograd reads it with one GEMV. Names, the state dict and the values stay HF's; prefill, training
and anything with autograd run the modules' own forwards. `StaticGreedyDecoder` packs its model when it is built,
so a model cast or moved since an earlier decoder is packed again.
"""
from __future__ import annotations

import os
import sys
import types

from torch import nn

from hybrid_distill.distill.merged_projections import MERGED_ATTENTION, MERGED_MLP, attend, mergeable
from hybrid_distill.models.mixers import LinearMixer
from hybrid_distill.models.packed_inputs import pack_linears, packed_projections
from hybrid_distill.models.static_cache import FixedAddressKVLayer
from hybrid_distill.models.student import decoder_layers

PACKED_DECODE_CHOICES = ("on", "off")


def packed_decode_choice() -> str:
    """`HD_PACKED_DECODE`: on (the default since session 30: graphed decode at 8k x 16 on an H100, teacher and
    hybrid, +8% to +18% tokens/s), or off. Set it before the process starts."""
    choice = os.environ.get("HD_PACKED_DECODE", "on")
    if choice not in PACKED_DECODE_CHOICES:
        raise ValueError(f"HD_PACKED_DECODE must be on or off, not {choice!r}")
    return choice


def pack_decode_projections(model: nn.Module) -> int:
    """Packs the input projections of every softmax attention (Llama/Qwen2), linear mixer and MLP (Llama/Qwen2) of
    `model` in place, where they are not packed already; returns how many modules are packed."""
    packed = 0
    for layer in decoder_layers(model):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if isinstance(attention, LinearMixer):
            packed += pack_linears(attention, attention.input_linears(), attention.packed_row_padding())
        elif type(attention).__name__ in MERGED_ATTENTION and mergeable(attention, ("q_proj", "k_proj", "v_proj")):
            packed += pack_linears(attention, (attention.q_proj, attention.k_proj, attention.v_proj))
            attention.forward = types.MethodType(_decode_attention_forward, attention)
        if type(mlp).__name__ in MERGED_MLP and mergeable(mlp, ("gate_proj", "up_proj")):
            packed += pack_linears(mlp, (mlp.gate_proj, mlp.up_proj))
            mlp.forward = types.MethodType(_decode_mlp_forward, mlp)
    return packed


def _decode_mlp_forward(self, x):
    """HF's Llama/Qwen2 MLP with gate and up from the packed GEMV on a decode token."""
    projected = packed_projections(self, x)
    if projected is None:
        return type(self).forward(self, x)
    gate, up = projected
    return self.down_proj(self.act_fn(gate) * up)


def _decode_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """HF's Llama/Qwen2 attention with q, k and v from the packed GEMV, for a decode token written into a
    fixed-address cache (static decoding); everything else runs the class's own forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer = cache.layers[self.layer_idx] if cache is not None and hasattr(cache, "layers") else None
    projected = packed_projections(self, hidden_states) if isinstance(layer, FixedAddressKVLayer) else None
    if projected is None or position_embeddings is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return attend(self, sys.modules[type(self).__module__], projected, hidden_states.shape[:-1], position_embeddings,
                  attention_mask, kwargs, update_cache=layer.update)
