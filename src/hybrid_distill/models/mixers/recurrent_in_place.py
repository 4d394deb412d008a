"""One decode step of fla's recurrent GDN kernel that writes the new state over the old one.

fla's fused_recurrent_gated_delta_rule allocates a new final state per call, so a fixed-address decode cache had to
copy it back into its buffer: 0.12 ms of a 2.7 ms hybrid step at SmolLM2 shapes and 0.42 of 6.7 ms at Llama-3.2-3B
shapes (docs/performance.md, session 6). The kernel's program for (sequence, head, value block) loads its block
of the initial state once, before the loop, and stores the same block of the final state once, after it, so the
initial and final state may share memory. The kernel takes no autotuning (which would run a mutating step more
than once); fla's GLA kernel does, which is why GLA layers still copy.
"""
from __future__ import annotations

import torch


def gated_delta_step_in_place(q, k, v, g, beta, scale: float, state: torch.Tensor, normalize_qk: bool = False):
    """fla's recurrent gated delta rule over q, k [B, T, H, K], v [B, T, H, V], g and beta [B, T, H], from and into
    `state` [B, H, K, V] float32 (contiguous); returns the output [B, T, H, V]."""
    import triton
    from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel

    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the state written in place must be contiguous float32, got {state.dtype}")
    q, k, v, g, beta = (tensor.contiguous() for tensor in (q, k, v, g, beta))
    batch, length, heads, key_dim = k.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if state.shape != (batch, value_heads, key_dim, value_dim):
        raise ValueError(f"state of shape {tuple(state.shape)} for {batch} sequences of {value_heads} heads, "
                         f"{key_dim} x {value_dim}")
    value_block = min(8, triton.next_power_of_2(value_dim))   # fla's own tiling for this kernel
    output = torch.empty_like(v)
    grid = (triton.cdiv(value_dim, value_block) * batch * value_heads,)
    fused_recurrent_gated_delta_rule_fwd_kernel[grid](
        q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=output, h0=state, ht=state,
        cu_seqlens=None, scale=scale, T=length, H=heads, HV=value_heads, K=key_dim, V=value_dim,
        BK=triton.next_power_of_2(key_dim), BV=value_block, IS_BETA_HEADWISE=beta.ndim != v.ndim,
        USE_QK_L2NORM_IN_KERNEL=normalize_qk, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False, STATE_V_FIRST=False,
        num_warps=1, num_stages=3)
    return output
