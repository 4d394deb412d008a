"""Gated DeltaNet mixer with flash-linear-attention's parameter names (q/k/v/a/b_proj, A_log, dt_bias, ...)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, torch_ops
from .base import LinearMixer, RMSNorm
from .spec import MixerSpec


class GatedDeltaNetMixer(LinearMixer):
    """o_t = S_t^T q_t with S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T; a_t, b_t data-dependent."""

    def __init__(self, spec: MixerSpec, layer_idx: int):
        super().__init__(spec, layer_idx)
        heads = spec.num_heads
        self.a_proj = nn.Linear(spec.hidden_size, heads, bias=False)
        self.b_proj = nn.Linear(spec.hidden_size, heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.o_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.reset_fresh_parameters()

    @property
    def output_norm(self) -> RMSNorm:
        return self.o_norm

    def reset_fresh_parameters(self) -> None:
        """Init of everything the teacher has no counterpart for; each choice aims at a near-teacher start."""
        with torch.no_grad():
            # gates start input-independent, so the first steps see a plain decayed linear attention
            self.a_proj.weight.zero_()
            self.b_proj.weight.zero_()            # beta = sigmoid(0) = 0.5: a half-strength delta update
            self.A_log.zero_()                    # A = 1: the decay rate is softplus(dt_bias) alone
            # per-head decays spread log-uniformly over e^-0.1 .. e^-0.001: short- and long-memory heads,
            # the slow ones close to softmax attention, which never forgets
            steps = torch.linspace(0, 1, self.spec.num_heads)
            dt = torch.exp(math.log(1e-1) + steps * (math.log(1e-3) - math.log(1e-1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
            if self.spec.use_short_conv:
                for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                    conv.reset_to_identity()      # the conv passes the teacher's projections through
            if self.spec.use_output_gate:
                nn.init.normal_(self.g_proj.weight, std=0.02)
            self.o_norm.weight.fill_(1.0)

    def _kernel_inputs(self, hidden_states, keep, conv_caches):
        q, k, v, (a_logits, b_logits), conv_caches = self._project_and_convolve(hidden_states, keep, conv_caches)
        if not kernels.use_fla_qk_l2norm(q):  # else fla's kernel normalises them (HD_QK_L2NORM=fla)
            q, k = torch_ops.l2_normalize(q), torch_ops.l2_normalize(k)
        decay_log = -self.A_log.float().exp() * F.softplus(a_logits.float() + self.dt_bias.float())
        beta = torch.sigmoid(b_logits.float())
        if self.spec.allow_neg_eigval:
            beta = beta * 2.0
        if keep is not None:  # padded positions neither decay nor write the state
            decay_log, beta = decay_log * keep[..., None], beta * keep[..., None]
        return (q, k, v, decay_log, beta.to(v.dtype)), conv_caches

    def _fused_decode_step(self, hidden_states, keep, slot):
        """decode_step_triton's one kernel (HD_GDN_DECODE=fused) for a decode token into a fixed-address cache."""
        if not self._fuses_decode(hidden_states, keep, slot, "HD_GDN_DECODE"):
            return None
        from .decode_step_triton import gdn_decode_step

        convs = self._convs() if self.spec.use_short_conv else ()
        (q, k, v), (a_logits, b_logits) = self._project_inputs(hidden_states)
        gate = self.g_proj(hidden_states) if self.spec.use_output_gate else None
        return gdn_decode_step(q, k, v, a_logits, b_logits, slot.conv_caches if convs else None,
                               [conv.weight for conv in convs] or None, self.A_log, self.dt_bias,
                               slot.recurrent_state, gate, self.o_norm.weight, self.o_norm.eps,
                               self.spec.head_dim ** -0.5, self.spec.allow_neg_eigval)

    def _gate_linears(self):
        return self.a_proj, self.b_proj

    def _decode_gates(self, hidden_states):
        """The a and b projections of one decode token as one weighted sum over both weights, which the compiler
        fuses with the gate maths: as two GEMVs with 9 outputs they took 12% of a graphed decode step at SmolLM2
        shapes on an H100 (docs/performance.md)."""
        both = (hidden_states.unsqueeze(-2) * torch.cat([self.a_proj.weight, self.b_proj.weight])).sum(-1)
        return list(both.split(self.spec.num_heads, dim=-1))

    def _kernel(self, kernel_inputs, recurrent_state, output_final_state: bool, state_in_place: bool = False):
        q, k, v, decay_log, beta = kernel_inputs
        return kernels.gated_delta_rule(q, k, v, decay_log, beta, scale=self.spec.head_dim ** -0.5,
                                        initial_state=recurrent_state, output_final_state=output_final_state,
                                        normalize_qk=kernels.use_fla_qk_l2norm(q), state_in_place=state_in_place)
