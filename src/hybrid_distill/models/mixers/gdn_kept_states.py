"""fla's chunked gated delta rule with its WY factor w, chunk states h and updated values kept for backward
(HD_GDN_KEEP_STATES=on, CUDA, training sequences).

Why: fla's backward first recomputes w, u and every chunk's state h from the forward's inputs. In a graphed
all-GDN step at SmolLM2 shapes on an H200 (session 21's profile) that was half of `recompute_w_u_fwd_kernel`'s
2.7 ms and of `chunk_gated_delta_rule_fwd_kernel_h`'s 3.4 ms: about 3 ms of a 140 ms step. Keeping w, h and the
updated values from the forward skips it, for three more bf16 tensors of the layer's q size per GDN layer (about
3.4 GB at 64 x 512 tokens over 30 layers). The forward and backward call fla's own kernels in fla's order, so the
values are fla's. It bypasses fla's backend dispatch: FlashQLA, which fla picks for head_dim 128, does not run.
"""
from __future__ import annotations

import torch

CHUNK = 64  # fla's chunk length for GDN


class _GatedDeltaRuleKeptStates(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, g, beta, scale: float, initial_state, output_final_state: bool):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2

        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        g_cum = chunk_local_cumsum(g.contiguous(), chunk_size=CHUNK, scale=RCP_LN2)  # log2 decays within chunks
        w, u, wy_inverse = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g_cum, beta=beta, chunk_size=CHUNK)
        states, new_values, final_state = chunk_gated_delta_rule_fwd_h(
            k=k, w=w, u=u, g=g_cum, initial_state=initial_state, output_final_state=output_final_state,
            chunk_size=CHUNK)
        output = chunk_fwd_o(q=q, k=k, v=new_values, h=states, g=g_cum, scale=scale, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, g_cum, beta, wy_inverse, w, states, new_values, initial_state)
        ctx.scale = scale
        return output.to(q.dtype), final_state

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_output, d_final_state):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd
        from fla.ops.utils import chunk_local_cumsum

        q, k, v, g_cum, beta, wy_inverse, w, states, new_values, initial_state = ctx.saved_tensors
        d_output = d_output.contiguous()
        d_final_state = None if d_final_state is None else d_final_state.contiguous()
        d_values = chunk_bwd_dv_local(q=q, k=k, g=g_cum, do=d_output, scale=ctx.scale, chunk_size=CHUNK)
        d_states, d_initial_state, d_values = chunk_gated_delta_rule_bwd_dhu(
            q=q, k=k, w=w, g=g_cum, h0=initial_state, dht=d_final_state, do=d_output, dv=d_values, scale=ctx.scale,
            chunk_size=CHUNK)
        dq, dk, dw, dg = chunk_bwd_dqkwg(q=q, k=k, v=new_values, w=w, g=g_cum, h=states, dv=d_values, do=d_output,
                                         dh=d_states, scale=ctx.scale, chunk_size=CHUNK)
        dk_wy, dv, d_beta, dg_wy = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g_cum, A=wy_inverse, dw=dw,
                                                       du=d_values)
        dk.add_(dk_wy)
        dg.add_(dg_wy)
        dg = chunk_local_cumsum(dg, chunk_size=CHUNK, reverse=True)
        grads = [grad.to(dtype) for grad, dtype in zip((dq, dk, dv, dg, d_beta), ctx.dtypes)]
        return (*grads, None, d_initial_state, None)


@torch.compiler.disable  # fla's kernels, as at the mixer's other kernel calls
def gated_delta_rule_kept_states(q, k, v, g, beta, scale: float, initial_state=None, output_final_state=False):
    """fla's chunk_gated_delta_rule (q and k already L2-normalised) with w, h and the updated values kept for
    backward: (output [B, T, H, V], final state or None)."""
    return _GatedDeltaRuleKeptStates.apply(q, k, v, g, beta, scale, initial_state, output_final_state)
