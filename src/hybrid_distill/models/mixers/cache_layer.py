"""The decoding cache of a linear layer, living in the HF Cache next to the softmax layers' KV entries."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class RecurrentStateLayer(DynamicLayer):
    """Holds (conv caches, recurrent state) and the number of tokens seen; stores no keys or values.

    It subclasses DynamicLayer so that every Cache method (masks, lengths, reset) treats it as a full-attention
    layer of the right length, while its memory stays constant in the sequence length.
    """

    state_in_place = False  # whether a mixer may write its new recurrent state into `recurrent_state` itself

    def __init__(self):
        super().__init__()
        self.tokens_seen = 0
        self.conv_caches = None
        self.recurrent_state = None

    def store(self, conv_caches, recurrent_state, new_tokens: int) -> None:
        self.conv_caches, self.recurrent_state = conv_caches, recurrent_state
        self.tokens_seen += new_tokens
        self.is_initialized = True
        self.device, self.dtype = recurrent_state.device, recurrent_state.dtype

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens_seen + query_length, 0

    def reset(self) -> None:
        self.tokens_seen, self.conv_caches, self.recurrent_state = 0, None, None
        self.is_initialized = False

    def _map_states(self, function) -> None:
        if self.recurrent_state is not None:
            self.recurrent_state = function(self.recurrent_state)
        if self.conv_caches is not None:
            self.conv_caches = tuple(function(c) for c in self.conv_caches)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        raise ValueError("a linear layer's recurrent state cannot be cropped back to an earlier length")

    def offload(self) -> None:
        self._map_states(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_states(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        tensors = [self.recurrent_state] if self.recurrent_state is not None else []
        tensors += list(self.conv_caches or ())
        return sum(t.numel() * t.element_size() for t in tensors)


def state_layer(cache, layer_idx: int) -> RecurrentStateLayer:
    """The layer's state slot in `cache`, created on first use (HF may pre-fill plain DynamicLayers)."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    if not isinstance(layers[layer_idx], RecurrentStateLayer):
        layers[layer_idx] = RecurrentStateLayer()
    return layers[layer_idx]
