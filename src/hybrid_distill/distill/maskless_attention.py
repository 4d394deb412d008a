"""Causal attention without HF's mask building, for training forwards over unpadded, unpacked rows.

HF builds an attention mask at every forward and, to decide whether it may skip it, reads GPU tensors on the
host (the packed-sequence check on position ids, `padding_mask.all()`): one host-GPU synchronisation per model
forward, which stops the host from queueing the next kernels while the GPU works. Training rows here are never
padded and always start at position 0, so the mask HF would build is plain causal, which SDPA's `is_causal`
computes without any mask. Under `maskless_causal_attention`, models on `sdpa` use an attention function that
HF knows no mask builder for (so it builds none), and which calls the same SDPA function with no mask.
"""
from __future__ import annotations

import contextlib

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

MASKLESS_SDPA = "hd_causal_sdpa"


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register(MASKLESS_SDPA, _causal_sdpa)


def has_windowed_layers(config) -> bool:
    """Sliding-window layers need their mask; such models keep HF's mask building."""
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "use_sliding_window", False)) or any(kind != "full_attention" for kind in layer_types)


@contextlib.contextmanager
def maskless_causal_attention(*models):
    """Within the block, forwards of `models` (unpadded rows from position 0 only) build no attention mask."""
    switched = []
    for model in models:
        config = model.config
        if config._attn_implementation == "sdpa" and not has_windowed_layers(config):
            config._attn_implementation = MASKLESS_SDPA
            switched.append(config)
    try:
        yield
    finally:
        for config in switched:
            config._attn_implementation = "sdpa"
