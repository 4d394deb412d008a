"""A linear layer's whole decode step between its input and output projections, as one Triton kernel per layer
(GDN and GLA).

Why: a graphed decode step at SmolLM2 shapes is launch-bound. Compiled, a GDN layer's step between its projections
ran about nine small kernels (the three short convs and their caches, the q/k norms, the gates), then fla's
recurrent kernel and the output norm: 0.49 ms of an 8k x 16 hybrid step of 1.64 ms device time on an H100, in
kernels of 1-8 us each (docs/performance.md, session 31). Here one program per (sequence, head) does all of it on its
head's channels: it owns those channels of the three conv caches and that head's state, so it shifts the caches
and overwrites the state in place with no other program reading them (session 36: the hybrid's decode +30% at
SmolLM2 shapes, +7.7% at Llama-3.2-3B shapes).

Per program, in the order and roundings of the compiled path (`HD_GDN_DECODE=compiled`, models/mixers/gdn.py, gla.py):
  x' = silu(conv(cache, x)) for q, k, v (rounded to the input dtype), cache shifted to end in x;
  GDN: q, k = l2norm(q), l2norm(k) (rounded); decay = -exp(A_log) * softplus(a + dt_bias); beta = sigmoid(b) [x 2];
       S = exp(decay) S;  v'' = beta (v' - S^T k);  S += k v''^T;
  GLA: decay_c = logsigmoid(W_gk r + b_gk)_c / normalizer per key channel c (r: the low-rank gate projection);
       S = diag(exp(decay)) S;  S += k v'^T;
  o = S^T q * scale (rounded);  out = rmsnorm(o) * weight [* silu(gate)] (rounded).
Under TRITON_INTERPRET=1 it runs on CPU tensors, which is how the tests check it against the compiled path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_step(x, cache_ptr, weight_ptr, channels, mask, TAPS: tl.constexpr, HISTORY: tl.constexpr):
    """(silu(conv) of one token over its channels, in float32; the cache [channels, TAPS - 1] (oldest first) shifted
    to end in `x`, to be stored after the program's barrier)."""
    acc = x.to(tl.float32) * tl.load(weight_ptr + channels * TAPS + TAPS - 1, mask=mask, other=0).to(tl.float32)
    taps = tl.arange(0, HISTORY)[None, :]
    kept = mask[:, None] & (taps < TAPS - 1)
    at = cache_ptr + channels[:, None] * (TAPS - 1) + taps
    history = tl.load(at, mask=kept, other=0)
    weights = tl.load(weight_ptr + channels[:, None] * TAPS + taps, mask=kept, other=0).to(tl.float32)
    acc += tl.sum(history.to(tl.float32) * weights, 1)
    later = tl.load(at + 1, mask=mask[:, None] & (taps < TAPS - 2), other=0)
    shifted = tl.where(taps == TAPS - 2, x[:, None].to(history.dtype), later)
    return acc * tl.sigmoid(acc), shifted


@triton.jit
def _l2_normalized(x):
    return x * tl.rsqrt(tl.sum(x * x) + 1e-6)


@triton.jit
def linear_decode_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, row_stride_q, row_stride_k, row_stride_v, row_stride_a,
                         row_stride_b, q_cache, k_cache, v_cache, q_weight, k_weight, v_weight, a_log_ptr, dt_bias_ptr,
                         decay_weight_ptr, decay_bias_ptr, decay_normalizer, state_ptr, gate_ptr, row_stride_gate,
                         norm_weight_ptr, out_ptr, scale, norm_eps, HEADS: tl.constexpr, DIM: tl.constexpr,
                         BLOCK: tl.constexpr, TAPS: tl.constexpr, HISTORY: tl.constexpr, RANK: tl.constexpr,
                         RANK_BLOCK: tl.constexpr, GLA: tl.constexpr, HAS_CONV: tl.constexpr, HAS_GATE: tl.constexpr,
                         NEG_EIGVAL: tl.constexpr):
    """GDN: a, b are the [B, H] gate logits. GLA (`GLA`): a is the [B, RANK] low-rank gate projection, and
    decay_weight [H*D, RANK], decay_bias [H*D] its second factor."""
    program = tl.program_id(0).to(tl.int64)
    row, head = program // HEADS, program % HEADS
    lanes = tl.arange(0, BLOCK)
    mask = lanes < DIM
    columns = head * DIM + lanes
    dtype = v_ptr.dtype.element_ty
    q = tl.load(q_ptr + row * row_stride_q + columns, mask=mask, other=0)
    k = tl.load(k_ptr + row * row_stride_k + columns, mask=mask, other=0)
    v = tl.load(v_ptr + row * row_stride_v + columns, mask=mask, other=0)
    if HAS_CONV:
        cache_row = row * HEADS * DIM * (TAPS - 1)
        cache_at = cache_row + columns[:, None] * (TAPS - 1) + tl.arange(0, HISTORY)[None, :]
        cache_mask = mask[:, None] & (tl.arange(0, HISTORY)[None, :] < TAPS - 1)
        q, q_shifted = _conv_step(q, q_cache + cache_row, q_weight, columns, mask, TAPS, HISTORY)
        k, k_shifted = _conv_step(k, k_cache + cache_row, k_weight, columns, mask, TAPS, HISTORY)
        v, v_shifted = _conv_step(v, v_cache + cache_row, v_weight, columns, mask, TAPS, HISTORY)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    v = v.to(tl.float32)
    state_at = state_ptr + program * DIM * DIM + lanes[:, None] * DIM + lanes[None, :]   # [key, value]
    state_mask = mask[:, None] & mask[None, :]
    if GLA:
        q = q.to(tl.float32) * scale
        k = k.to(tl.float32)
        ranks = tl.arange(0, RANK_BLOCK)
        low_rank = tl.load(a_ptr + row * row_stride_a + ranks, mask=ranks < RANK, other=0).to(tl.float32)
        factor = tl.load(decay_weight_ptr + columns[:, None] * RANK + ranks[None, :],
                         mask=mask[:, None] & (ranks[None, :] < RANK), other=0).to(tl.float32)
        logits = tl.sum(factor * low_rank[None, :], 1) + tl.load(decay_bias_ptr + columns, mask=mask,
                                                                  other=0).to(tl.float32)
        logits = logits.to(dtype).to(tl.float32)   # the eager projection's output dtype
        decay = (tl.minimum(logits, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(logits)))) / decay_normalizer
        state = tl.load(state_at, mask=state_mask, other=0) * tl.exp(decay)[:, None]
    else:
        q = _l2_normalized(q.to(tl.float32)).to(dtype).to(tl.float32) * scale
        k = _l2_normalized(k.to(tl.float32)).to(dtype).to(tl.float32)
        a = tl.load(a_ptr + row * row_stride_a + head).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32)
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
        decay = -tl.exp(tl.load(a_log_ptr + head).to(tl.float32)) * softplus
        beta = tl.sigmoid(tl.load(b_ptr + row * row_stride_b + head).to(tl.float32))
        if NEG_EIGVAL:
            beta = beta * 2.0
        beta = beta.to(dtype).to(tl.float32)
        state = tl.load(state_at, mask=state_mask, other=0) * tl.exp(decay)
    # Every read of the caches and the state comes before this barrier, every write after it: a vector of one
    # head's channels is held twice or more over the program's threads, and a warp running ahead must not shift a
    # cache column that a slower warp's copy has still to read (on an H100 it did, before the barrier).
    tl.debug_barrier()
    if HAS_CONV:
        tl.store(q_cache + cache_at, q_shifted, mask=cache_mask)
        tl.store(k_cache + cache_at, k_shifted, mask=cache_mask)
        tl.store(v_cache + cache_at, v_shifted, mask=cache_mask)
    if GLA:
        state += k[:, None] * v[None, :]
    else:
        update = beta * (v - tl.sum(state * k[:, None], 0))
        state += k[:, None] * update[None, :]
    tl.store(state_at, state, mask=state_mask)
    output = tl.sum(state * q[:, None], 0).to(dtype).to(tl.float32)

    normed = output * tl.rsqrt(tl.sum(output * output) / DIM + norm_eps)
    normed = normed * tl.load(norm_weight_ptr + lanes, mask=mask, other=0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * row_stride_gate + columns, mask=mask, other=0).to(tl.float32)
        normed = normed * (gate * tl.sigmoid(gate))
    tl.store(out_ptr + row * HEADS * DIM + columns, normed.to(dtype), mask=mask)


def _rows(tensor: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """`tensor` [B, 1, width] (a view into a packed GEMV's output may have a longer row) as [B, width] rows whose
    elements are contiguous."""
    if tensor.dim() != 3 or tensor.shape[1] != 1 or tensor.shape[2] != width or tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be [batch, 1, {width}] with contiguous elements, got {tuple(tensor.shape)} "
                         f"with strides {tensor.stride()}")
    return tensor[:, 0]


def _launch(q, k, v, a, a_width: int, b, conv_caches, conv_weights, state, gate, norm_weight, norm_eps: float,
            scale: float, num_warps: int | None, **mixer) -> torch.Tensor:
    """Checks the buffers and launches one program per (sequence, head); `mixer` holds the kernel's mixer-specific
    arguments. Returns the normed output [B, 1, H*D]."""
    heads, dim = state.shape[1], state.shape[2]
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape[3] != dim:
        raise ValueError(f"the state must be a contiguous float32 [B, H, D, D] buffer, got {state.dtype} "
                         f"{tuple(state.shape)}")
    inner = heads * dim
    q_rows, k_rows, v_rows = (_rows(x, inner, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    a_rows = _rows(a, a_width, "a" if b is not None else "the low-rank gate")
    b_rows = _rows(b, heads, "b") if b is not None else a_rows
    gate_rows = _rows(gate, inner, "gate") if gate is not None else v_rows
    has_conv = conv_caches is not None
    if has_conv:
        for cache in conv_caches:
            if not cache.is_contiguous() or cache.shape[:2] != (state.shape[0], inner):
                raise ValueError(f"conv caches must be contiguous [B, {inner}, taps - 1], got {tuple(cache.shape)}")
        taps = conv_weights[0].shape[-1]
        conv_weights = [weight.reshape(inner, taps).contiguous() for weight in conv_weights]
    else:
        conv_caches, conv_weights, taps = (state,) * 3, (state,) * 3, 1
    output = torch.empty(state.shape[0], 1, inner, dtype=v.dtype, device=v.device)
    linear_decode_kernel[(state.shape[0] * heads,)](
        q_rows, k_rows, v_rows, a_rows, b_rows, q_rows.stride(0), k_rows.stride(0), v_rows.stride(0),
        a_rows.stride(0), b_rows.stride(0), *conv_caches, *conv_weights, state_ptr=state, gate_ptr=gate_rows,
        row_stride_gate=gate_rows.stride(0), norm_weight_ptr=norm_weight, out_ptr=output, scale=scale,
        norm_eps=norm_eps, HEADS=heads, DIM=dim, BLOCK=triton.next_power_of_2(dim), TAPS=taps,
        HISTORY=triton.next_power_of_2(max(taps - 1, 1)), HAS_CONV=has_conv, HAS_GATE=gate is not None,
        num_warps=num_warps or (2 if dim <= 64 else 4), **mixer)
    return output


def gdn_decode_step(q, k, v, a, b, conv_caches, conv_weights, A_log, dt_bias, state, gate, norm_weight,
                    norm_eps: float, scale: float, neg_eigval: bool = False,
                    num_warps: int | None = None) -> torch.Tensor:
    """One decode token of a GDN layer: q, k, v [B, 1, H*D] and a, b [B, 1, H] from its input projections;
    conv_caches [B, H*D, taps - 1] x 3 and conv_weights [H*D, taps] x 3 (both None without short convs), shifted in
    place; state [B, H, D, D] float32, overwritten; gate [B, 1, H*D] or None. Returns the normed output
    [B, 1, H*D] for the output projection. `num_warps` per program: 2 up to head size 64, else 4, unless given
    (scripts/bench_decode_step.py times the choices)."""
    return _launch(q, k, v, a, state.shape[1], b, conv_caches, conv_weights, state, gate, norm_weight, norm_eps,
                   scale, num_warps, a_log_ptr=A_log, dt_bias_ptr=dt_bias, decay_weight_ptr=A_log,
                   decay_bias_ptr=A_log, decay_normalizer=1.0, RANK=1, RANK_BLOCK=1, GLA=False,
                   NEG_EIGVAL=neg_eigval)


def gla_decode_step(q, k, v, low_rank, decay_weight, decay_bias, decay_normalizer: float, conv_caches, conv_weights,
                    state, gate, norm_weight, norm_eps: float, scale: float,
                    num_warps: int | None = None) -> torch.Tensor:
    """One decode token of a GLA layer: as gdn_decode_step, with the decay from the low-rank gate projection
    `low_rank` [B, 1, R] through decay_weight [H*D, R] and decay_bias [H*D] (gk_proj's second factor)."""
    rank = decay_weight.shape[1]
    if decay_weight.shape[0] != state.shape[1] * state.shape[2] or not decay_weight.is_contiguous():
        raise ValueError(f"the decay weight must be a contiguous [{state.shape[1] * state.shape[2]}, rank] matrix, "
                         f"got {tuple(decay_weight.shape)}")
    return _launch(q, k, v, low_rank, rank, None, conv_caches, conv_weights, state, gate, norm_weight, norm_eps,
                   scale, num_warps, a_log_ptr=decay_bias, dt_bias_ptr=decay_bias, decay_weight_ptr=decay_weight,
                   decay_bias_ptr=decay_bias, decay_normalizer=decay_normalizer, RANK=rank,
                   RANK_BLOCK=triton.next_power_of_2(rank), GLA=True, NEG_EIGVAL=False)
