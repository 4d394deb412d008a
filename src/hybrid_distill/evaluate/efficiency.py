"""Inference cost of a model: prefill latency, cached decoding throughput, cache size and peak GPU memory.

Decoding is a plain loop of one-token greedy steps (no `generate`, whose per-step overhead would hide the
difference between a growing KV cache and a constant recurrent state). On a GPU each step is by default one CUDA
graph replay on a fixed-address cache (evaluate/static_decode.py), for teacher and hybrid alike: at small model
sizes an eager step measures kernel launches, not the model. `cuda_graphs=False` times the eager HF loop.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

from hybrid_distill.evaluate.loading import load_for_evaluation, resolve_device
from hybrid_distill.evaluate.run_eval import json_safe, write_json_atomic
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder
from hybrid_distill.models.cache_names import cache_keyword, output_cache
from hybrid_distill.models.mixers.cache_layer import RecurrentStateLayer

log = logging.getLogger(__name__)

MEASUREMENT_SEED = 0


def cache_nbytes(cache) -> int:
    """Bytes held by an HF cache: keys + values of softmax layers, recurrent and conv states of linear layers."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RecurrentStateLayer):
            total += layer.nbytes()
        elif isinstance(layer, DynamicLayer):
            for tensor in (layer.keys, layer.values):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        else:
            raise TypeError(f"cache layer {type(layer).__name__} is not measured; add it to cache_nbytes")
    return total


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op off CUDA), so that host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_and_decode(model, prompt: torch.Tensor, decode_tokens: int, graphed: bool) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, cache bytes after prefill) for one run from an empty cache.

    With `graphed`, building the decoder (cache copy, warm-up, capture) happens between the two timed parts."""
    device = prompt.device
    synchronize(device)
    start = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    cache = output_cache(output)
    cache_bytes = cache_nbytes(cache)
    if graphed:
        decoder = StaticGreedyDecoder(model, output, prompt.shape[1], decode_tokens, use_graph=True)
        del output, cache
        synchronize(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            decoder.step()
        synchronize(device)
        return prefill_s, time.perf_counter() - start, cache_bytes
    next_token = output.logits[:, -1].argmax(-1, keepdim=True)
    keyword = cache_keyword(model)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        output = model(input_ids=next_token, use_cache=True, **{keyword: cache})
        cache = output_cache(output)
        next_token = output.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    return prefill_s, time.perf_counter() - start, cache_bytes


@torch.no_grad()
def measure_inference(model, context_lengths: Sequence[int], batch_sizes: Sequence[int], decode_tokens: int = 32,
                      warmup: int = 1, repeats: int = 3, device: str | torch.device | None = None,
                      cuda_graphs: bool = True) -> list[dict]:
    """One row per (context, batch): median prefill seconds, decode tokens/s, cache bytes, CUDA peak bytes.

    `cuda_graphs` applies on CUDA only (each row says which decode loop it timed in "decode").

    Inputs are random token ids (content does not change the cost). A setting that runs out of GPU memory
    gets a row of nulls instead of ending the whole measurement.
    """
    if repeats < 1 or warmup < 0 or decode_tokens < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, decode_tokens >= 1 (got {repeats}, {warmup}, "
                         f"{decode_tokens})")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    model.to(device).eval()
    generator = torch.Generator().manual_seed(MEASUREMENT_SEED)
    graphed = cuda_graphs and device.type == "cuda"
    rows = []
    for context in context_lengths:
        for batch in batch_sizes:
            prompt = torch.randint(model.config.vocab_size, (batch, context), generator=generator).to(device)
            row = {"context": int(context), "batch": int(batch), "prefill_s": None, "decode_tok_s": None,
                   "cache_bytes": None, "peak_mem_bytes": None,
                   "decode": "cuda_graph" if graphed else "eager"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                runs = [_prefill_and_decode(model, prompt, decode_tokens, graphed) for _ in range(warmup + repeats)][warmup:]
            except torch.cuda.OutOfMemoryError:
                log.warning("context %d, batch %d: out of GPU memory; recorded as null", context, batch)
                rows.append(row)
                continue
            decode_s = statistics.median(run[1] for run in runs)
            row.update(prefill_s=statistics.median(run[0] for run in runs),
                       decode_tok_s=batch * decode_tokens / decode_s,
                       cache_bytes=runs[-1][2],
                       peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
            log.info("context %d, batch %d: prefill %.4fs, decode %.1f tok/s, cache %d bytes", context, batch,
                     row["prefill_s"], row["decode_tok_s"], row["cache_bytes"])
            rows.append(row)
    return rows


def write_efficiency(model_dir, out_json, context_lengths: Sequence[int], batch_sizes: Sequence[int],
                     decode_tokens: int = 32, warmup: int = 1, repeats: int = 3, device: str | None = None,
                     dtype: str = "auto", extra: dict | None = None, cuda_graphs: bool = True) -> dict:
    """Measure the checkpoint in `model_dir` and write {"model_dir", "device", "dtype", "rows", **extra} atomically."""
    model = load_for_evaluation(model_dir, dtype=dtype, device=device)
    rows = measure_inference(model, context_lengths, batch_sizes, decode_tokens, warmup, repeats,
                             cuda_graphs=cuda_graphs)
    device_name = next(model.parameters()).device
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    payload = {"model_dir": str(Path(model_dir)), "device": str(device_name), "dtype": model_dtype,
               "decode_tokens": decode_tokens, "repeats": repeats, "rows": rows, **(extra or {})}
    if device_name.type == "cuda":
        payload["device_name"] = torch.cuda.get_device_name(device_name)
    write_json_atomic(out_json, json_safe(payload))
    log.info("wrote %s", out_json)
    return payload
