"""torch.compile of the dense, elementwise-heavy parts of a decoder (MLPs and RMS norms), leaving attention and
fla's mixers to their own kernels: at small hidden sizes a training step is bound by many small elementwise
kernels (norm, SiLU-gate, casts), which the compiler fuses.
"""
from __future__ import annotations

from torch import nn

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
    """Compile every linear mixer of `model` in place (projections, short convs, gates, norms; fla's kernel
    calls stay opaque to the compiler); returns how many. Bench option until a GPU number says it pays."""
    mixers = list(mixers_of(model).values())
    for mixer in mixers:
        mixer.compile(dynamic=False)
    return len(mixers)
