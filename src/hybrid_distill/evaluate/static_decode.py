"""Greedy decoding in fixed-address buffers, replayed as one CUDA graph per token on a GPU.

At 135M parameters a decode step is launch-bound (about 20 ms per token for 30 layers of small kernels, measured
in docs/performance.md), so decode tokens/s measured with an eager loop says more about the host than about the
model. Here the whole step (forward, argmax, cache write, position and mask advance) is captured once and replayed,
for the teacher and the hybrid alike. A graph needs fixed addresses and no host reads inside the step:
- the cache is swapped for its fixed-address twin after a normal prefill (models/static_cache.py);
- the step gets a prepared additive mask over the whole KV buffer (HF builds no mask from a 4-D one, and the
  mixers see no padding mask), opened one position per step on the device;
- attention of the one query token runs as SDPA over KV-head groups, so no copy of the cache per head
  (HF's SDPA path repeats the KV heads whenever a mask is given).
Without CUDA (or with graphs off) the same step runs eagerly, so the CPU tests check the function the GPU replays.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from hybrid_distill.distill.maskless_attention import has_windowed_layers
from hybrid_distill.evaluate.packed_projections import pack_decode_projections, packed_decode_choice
from hybrid_distill.models.cache_names import cache_keyword, output_cache
from hybrid_distill.models.static_cache import advance, commit_deferred_writes, fix_cache_addresses

GROUPED_DECODE = "hd_grouped_decode"
GRAPH_WARMUP_STEPS = 2


def _grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query token against the whole buffer: [B, H, 1, D] x [B, KV, L, D] -> [B, 1, H, D].

    SDPA with `enable_gqa` reads each KV head once for its group of query heads; HF's SDPA path instead copies
    the KV heads per query head whenever a mask is given (a probe on an H100 at 8k x 16: 44 us per layer here,
    115 us with the copy, 434 us as two grouped matmuls)."""
    if query.shape[2] != 1:
        raise ValueError(f"grouped decode attention takes one query token, got {query.shape[2]}")
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                            scale=scaling, enable_gqa=True)
    return output.transpose(1, 2), None


AttentionInterface.register(GROUPED_DECODE, _grouped_decode_attention)


@contextlib.contextmanager
def grouped_decode_attention(model):
    """Within the block, the model's softmax layers use the grouped one-token attention."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = GROUPED_DECODE
    try:
        yield
    finally:
        config._attn_implementation = previous


class StaticGreedyDecoder:
    """From a prefilled cache, decode up to `max_new_tokens` greedily with `step()`; tokens land in `tokens`.

    `last_logits` holds the logits of the newest step (float32), for equality tests against an eager loop.
    """

    def __init__(self, model, prefill_output, prompt_length: int, max_new_tokens: int, use_graph: bool | None = None):
        """`prefill_output`: the model's output on the prompt with `use_cache=True` (its cache is taken over)."""
        if has_windowed_layers(model.config):
            raise ValueError("graphed decoding does not support sliding-window attention layers")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        if packed_decode_choice() == "on":
            pack_decode_projections(model)   # one GEMV per group of projections of a token (HD_PACKED_DECODE)
        logits = prefill_output.logits
        device = logits.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        batch = logits.shape[0]
        capacity = prompt_length + max_new_tokens + 1
        self.max_new_tokens = max_new_tokens
        self.write_position = torch.tensor([prompt_length], device=device)
        self.cache = output_cache(prefill_output)
        self.cache_argument = {cache_keyword(model): self.cache}
        self.deferred_writes = []  # the linear layers' new conv caches, copied together after each step's forward
        self.small_state = fix_cache_addresses(self.cache, capacity, self.write_position, self.deferred_writes)
        self.input_ids = logits[:, -1].argmax(-1, keepdim=True)
        self.prefill_token = self.input_ids.clone()  # what the prefill predicted: the first step's input
        self.position_ids = torch.full((batch, 1), prompt_length, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        dtype = next(model.parameters()).dtype   # SDPA wants the mask in the queries' dtype
        self.mask = torch.full((1, 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[..., :prompt_length + 1] = 0.0
        self.tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.last_logits = torch.zeros(batch, model.config.vocab_size, device=device)
        self.steps_taken = 0
        self._graph = self._capture() if self.use_graph else None

    def _mutable(self) -> list[torch.Tensor]:
        return [*self.small_state, self.input_ids, self.position_ids, self.write_position, self.step_index,
                self.mask, self.tokens, self.last_logits]

    @classmethod
    @torch.no_grad()
    def after_prefill(cls, model, prompt: torch.Tensor, max_new_tokens: int, use_graph: bool | None = None):
        """Run the prompt through `model` with a cache, then build the decoder on it."""
        output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return cls(model, output, prompt.shape[1], max_new_tokens, use_graph)

    @torch.no_grad()
    def _step_kernels(self) -> None:
        with grouped_decode_attention(self.model):
            output = self.model(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.mask,
                                use_cache=True, **self.cache_argument)
        commit_deferred_writes(self.deferred_writes)
        logits = output.logits[:, -1]
        self.last_logits.copy_(logits)
        next_token = logits.argmax(-1, keepdim=True)
        self.tokens.index_copy_(1, self.step_index, next_token)
        self.input_ids.copy_(next_token)
        self.write_position.add_(1)
        self.position_ids.add_(1)
        self.step_index.add_(1)
        self.mask.index_fill_(-1, self.write_position, 0.0)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up (kernel autotuning, lazy set-up) on a side stream, undo its state changes, capture one step."""
        saved = [tensor.clone() for tensor in self._mutable()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._step_kernels()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_kernels()
        # the KV buffers are not restored: the warm-up wrote them only at positions the mask keeps closed until
        # the real steps have overwritten them
        for tensor, value in zip(self._mutable(), saved):
            tensor.copy_(value)
        return graph

    def step(self) -> None:
        """Decode one token for every row (queued on the GPU; nothing is read back)."""
        if self.steps_taken >= self.max_new_tokens:
            raise RuntimeError(f"this decoder was built for {self.max_new_tokens} new tokens")
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step_kernels()
        advance(self.cache)
        self.steps_taken += 1
