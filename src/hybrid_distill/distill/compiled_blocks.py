"""torch.compile of the elementwise-heavy parts of a model (MLPs, RMS norms, softmax attention's projections,
rotary embedding and layout changes around SDPA, the mixers' maths around fla's kernels), leaving fla's kernels
and the residual stream to themselves: at small hidden sizes a training step is bound by many small elementwise
kernels (norm, SiLU-gate, casts, rotary, transposes, gates), which the compiler fuses.
"""
from __future__ import annotations

import torch
from torch import nn

from hybrid_distill.models.mixers import LinearMixer
from hybrid_distill.models.student import decoder_layers, mixers_of

DENSE_BLOCKS = ("mlp", "input_layernorm", "post_attention_layernorm")


def compile_dense_blocks(model: nn.Module) -> int:
    """Compile (in place, so names and the state dict are unchanged) every layer's MLP and norms and the final
    norm of `model`; returns how many modules. Shapes are static in training, so no dynamic-shape guards."""
    modules = [getattr(layer, name) for layer in decoder_layers(model) for name in DENSE_BLOCKS
               if isinstance(getattr(layer, name, None), nn.Module)]
    final_norm = getattr(getattr(model, "model", model), "norm", None)
    if isinstance(final_norm, nn.Module):
        modules.append(final_norm)
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


def compile_mixers(model: nn.Module) -> int:
    """Compile the tensor maths of every linear mixer of `model` in place (projections, short convs, gates,
    norms); fla's kernel call and the cache bookkeeping stay outside the compiled code, which is then the same
    pure function for training and decoding steps. Returns how many mixers."""
    mixers = list(mixers_of(model).values())
    for mixer in mixers:
        mixer._kernel_inputs = torch.compile(mixer._kernel_inputs, dynamic=False)
        mixer._finish = torch.compile(mixer._finish, dynamic=False)
    return len(mixers)


def compile_softmax_attention(model: nn.Module) -> int:
    """Compile every softmax attention module of `model` in place (SDPA itself stays ATen's kernel inside the
    graph); returns how many. Eager, their rotary embedding, casts and transposes were among the many small
    kernels left in a compiled-blocks all-softmax step's profile (docs/performance.md)."""
    modules = [layer.self_attn for layer in decoder_layers(model) if not isinstance(layer.self_attn, LinearMixer)]
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


def compile_student(model: nn.Module) -> int:
    """`distill.compile_blocks` for a student (and for a teacher, which has no mixers): dense blocks, softmax
    attention and mixer maths; returns how many modules were compiled."""
    return compile_dense_blocks(model) + compile_softmax_attention(model) + compile_mixers(model)
