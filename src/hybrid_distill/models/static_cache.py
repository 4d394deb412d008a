"""Decoding caches whose tensors never move, so one decode step can be captured as a CUDA graph and replayed.

A graph replays kernels on the addresses seen at capture time. HF's dynamic cache concatenates (new address
every step) and our recurrent layers swap in new state tensors; here softmax layers write keys and values in place
into buffers of the final length, at a position held in a device tensor, and linear layers keep their states in
fixed buffers: a GDN mixer's recurrent kernel writes its new state over the old one (recurrent_in_place.py), other
states are copied into their buffers, the conv caches of all layers by one multi-tensor copy after the step.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .mixers.cache_layer import RecurrentStateLayer


class FixedAddressKVLayer(DynamicLayer):
    """Keys/values of one softmax layer in [B, KV heads, capacity, D] buffers, written at `write_position`.

    `update` returns the whole buffers: positions not yet written must be masked out by the caller's mask. It
    leaves `tokens_seen` to the decoder (`advance`): a Python int changed inside a compiled attention module is a
    guard, and every new value recompiled every layer until Dynamo gave up and ran the rest eagerly (session 30).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, write_position: torch.Tensor):
        super().__init__()
        filled = keys.shape[2]
        if filled >= capacity:
            raise ValueError(f"cache capacity {capacity} must exceed the {filled} tokens already cached")
        shape = (*keys.shape[:2], capacity, keys.shape[3])
        self.keys = keys.new_zeros(shape)
        self.values = values.new_zeros((*values.shape[:2], capacity, values.shape[3]))
        self.keys[:, :, :filled].copy_(keys)
        self.values[:, :, :filled].copy_(values)
        self.write_position = write_position
        self.tokens_seen = filled
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise ValueError(f"a fixed-address cache takes one token per step, got {key_states.shape[2]}")
        self.keys.index_copy_(2, self.write_position, key_states)
        self.values.index_copy_(2, self.write_position, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def nbytes(self) -> int:
        """Bytes of the filled part, comparable with a dynamic cache at the same length."""
        per_token = (self.keys[:, :, 0].numel() + self.values[:, :, 0].numel()) * self.keys.element_size()
        return per_token * self.tokens_seen


class FixedAddressStateLayer(RecurrentStateLayer):
    """A linear layer's conv and recurrent states in buffers that every step overwrites.

    A mixer that can writes its new recurrent state into the buffer itself (`state_in_place`); any other new state
    is copied in at `store`. New conv caches are copied at once, or, given `deferred_writes`, listed there for
    `commit_deferred_writes` to copy together with the other layers' after the step (each conv cache is read only
    at its own layer's next step). Like the KV layers, it leaves `tokens_seen` to the decoder (`advance`), which
    also counts the steps that a graph replays without running this code.
    """

    state_in_place = True

    def __init__(self, source: RecurrentStateLayer, deferred_writes: list | None = None):
        super().__init__()
        if source.recurrent_state is None:
            raise ValueError("a linear layer's state must be filled by a prefill before it is fixed in place")
        self.recurrent_state = source.recurrent_state.clone()
        self.conv_caches = tuple(c.contiguous().clone() for c in source.conv_caches) if source.conv_caches else None
        self.tokens_seen = source.tokens_seen
        self.is_initialized = True
        self.device, self.dtype = source.device, source.dtype
        self.deferred_writes = deferred_writes

    def store(self, conv_caches, recurrent_state, new_tokens: int) -> None:
        if recurrent_state is not self.recurrent_state:  # else the mixer's kernel wrote it in place
            self.recurrent_state.copy_(recurrent_state)
        pairs = [(buffer, new) for buffer, new in zip(self.conv_caches or (), conv_caches or ()) if new is not buffer]
        if self.deferred_writes is None:
            for buffer, new in pairs:
                buffer.copy_(new)
        else:
            self.deferred_writes.extend(pairs)


def advance(cache, tokens: int = 1) -> None:
    """Count `tokens` more tokens in every layer of a fixed-address cache, after a step ran (eager or replayed)."""
    for layer in cache.layers:
        layer.tokens_seen += tokens


def commit_deferred_writes(deferred_writes: list) -> None:
    """Copy every (buffer, new value) pair that the layers' `store` listed, in one multi-tensor copy (on a GPU a few
    kernels in all instead of one per conv cache), and empty the list."""
    if deferred_writes:
        buffers, values = zip(*deferred_writes)
        torch._foreach_copy_(list(buffers), list(values))
        deferred_writes.clear()


def fix_cache_addresses(cache, capacity: int, write_position: torch.Tensor,
                        deferred_writes: list | None = None) -> list[torch.Tensor]:
    """Swap every layer of a prefilled HF cache for its fixed-address twin (linear layers list their conv-cache
    writes in `deferred_writes` if given); returns the tensors a step mutates besides the KV buffers (which a
    step writes only at `write_position`)."""
    small_state = []
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, RecurrentStateLayer):
            fixed = FixedAddressStateLayer(layer, deferred_writes)
            small_state += [fixed.recurrent_state, *(fixed.conv_caches or ())]
        elif isinstance(layer, DynamicLayer) and type(layer) is DynamicLayer and layer.is_initialized:
            fixed = FixedAddressKVLayer(layer.keys, layer.values, capacity, write_position)
        else:
            raise TypeError(f"cache layer {index} ({type(layer).__name__}) has no fixed-address twin; sliding-window "
                            f"and offloaded caches are not supported for graphed decoding")
        cache.layers[index] = fixed
    return small_state
