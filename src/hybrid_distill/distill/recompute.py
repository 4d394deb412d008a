"""Activation checkpointing of decoder layers: stage 2 keeps each layer's input and recomputes the rest in
backward, so peak memory stops growing with layers x tokens (at the cost of one more forward of the body).

Our own wrapper rather than transformers' `gradient_checkpointing_enable`: that API was renamed within the
transformers versions we support, and it checkpoints only in `.training` mode, while a stage-2 student may be
in eval mode (dropout off) and still train.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_distill.models.student import decoder_layers

_MARK = "_hd_recomputed"


def recompute_decoder_layers(model: nn.Module) -> int:
    """Make every decoder layer of `model` recompute its activations in backward; returns how many layers.

    Idempotent. Parameters, their names and the state dict are untouched (only the instances' forward changes),
    so checkpoints saved with or without it are interchangeable. Under no_grad the layers run as before.
    """
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, _MARK, False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        setattr(layer, _MARK, True)
    return len(layers)


def is_recomputed(model: nn.Module) -> bool:
    return all(getattr(layer, _MARK, False) for layer in decoder_layers(model))


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # Non-reentrant: keyword tensors (position embeddings, masks) and frozen inputs are handled, and the
    # recomputation sees the same RNG state. Inside a CUDA graph capture (distill.cuda_graphs) the RNG state
    # cannot be read, and is not needed: the students have no dropout (their configs' attention_dropout is 0).
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=not capturing, **kwargs)
