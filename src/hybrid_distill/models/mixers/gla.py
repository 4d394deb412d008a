"""Gated linear attention mixer with flash-linear-attention's parameter names (gk_proj.0/1, g_norm, ...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearMixer, RMSNorm
from .kernels import gated_linear_attention
from .spec import MixerSpec


class GatedLinearAttentionMixer(LinearMixer):
    """o_t = S_t^T q_t with S_t = diag(a_t) S_{t-1} + k_t v_t^T; a_t a per-channel data-dependent decay."""

    def __init__(self, spec: MixerSpec, layer_idx: int):
        super().__init__(spec, layer_idx)
        inner = spec.num_heads * spec.head_dim
        self.gk_proj = nn.Sequential(nn.Linear(spec.hidden_size, spec.gate_low_rank_dim, bias=False),
                                     nn.Linear(spec.gate_low_rank_dim, inner, bias=True))
        self.g_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.reset_fresh_parameters()

    @property
    def output_norm(self) -> RMSNorm:
        return self.g_norm

    def reset_fresh_parameters(self) -> None:
        """Init of everything the teacher has no counterpart for; each choice aims at a near-teacher start."""
        with torch.no_grad():
            # low-rank gate: small random first factor, zero second, so the decay starts input-independent
            nn.init.normal_(self.gk_proj[0].weight, std=0.02)
            self.gk_proj[1].weight.zero_()
            # bias 5: logsigmoid(5)/16 = -4e-4 per token, a near-lossless memory like softmax attention's
            self.gk_proj[1].bias.fill_(5.0)
            if self.spec.use_short_conv:
                for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                    conv.reset_to_identity()      # the conv passes the teacher's projections through
            if self.spec.use_output_gate:
                nn.init.normal_(self.g_proj.weight, std=0.02)
            self.g_norm.weight.fill_(1.0)

    def _kernel_inputs(self, hidden_states, keep, conv_caches):
        q, k, v, (gate_low_rank,), conv_caches = self._project_and_convolve(hidden_states, keep, conv_caches)
        gate_logits = self.gk_proj[1](gate_low_rank).float()
        decay_log = F.logsigmoid(gate_logits) / self.spec.gate_logit_normalizer
        decay_log = decay_log.reshape(*hidden_states.shape[:2], self.spec.num_heads, self.spec.head_dim)
        if keep is not None:  # padded positions neither decay nor write the state
            decay_log = decay_log * keep[..., None, None]
        return (q, k, v, decay_log), conv_caches

    def _fused_decode_step(self, hidden_states, keep, slot):
        """decode_step_triton's one kernel (HD_GLA_DECODE=fused) for a decode token into a fixed-address cache: the
        low-rank decay's second factor, the convs, the recurrence and the output norm in one launch."""
        if not self._fuses_decode(hidden_states, keep, slot, "HD_GLA_DECODE"):
            return None
        from .decode_step_triton import gla_decode_step

        convs = self._convs() if self.spec.use_short_conv else ()
        (q, k, v), (low_rank,) = self._project_inputs(hidden_states)
        gate = self.g_proj(hidden_states) if self.spec.use_output_gate else None
        factor = self.gk_proj[1]
        return gla_decode_step(q, k, v, low_rank, factor.weight, factor.bias, self.spec.gate_logit_normalizer,
                               slot.conv_caches if convs else None, [conv.weight for conv in convs] or None,
                               slot.recurrent_state, gate, self.g_norm.weight, self.g_norm.eps,
                               self.spec.head_dim ** -0.5)

    def _gate_linears(self):
        return (self.gk_proj[0],)

    def _kernel(self, kernel_inputs, recurrent_state, output_final_state: bool, state_in_place: bool = False):
        """The cache copies GLA's new state: fla's GLA kernel autotunes, so its first call runs the step more than
        once, which a state written in place would not survive (`state_in_place` is ignored)."""
        q, k, v, decay_log = kernel_inputs
        return gated_linear_attention(q, k, v, decay_log, scale=self.spec.head_dim ** -0.5,
                                      initial_state=recurrent_state, output_final_state=output_final_state)
