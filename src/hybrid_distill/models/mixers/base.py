"""What GDN and GLA mixers share: the HF attention call signature, padding, the decoding cache, output norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..packed_inputs import concatenated, packed_projections
from . import kernels
from .cache_layer import state_layer
from .short_conv import ShortConvolution
from .spec import MixerSpec

PROJECTION_ROW_MULTIPLE = 16  # elements per row of the fused input GEMM's output (see _project_inputs)


class RMSNorm(nn.Module):
    """Per-head RMS norm (weight shared across heads), optionally gated by silu(g) as fla's FusedRMSNormGated."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            normed = normed * F.silu(gate.float())
        return normed.to(x.dtype)


class LinearMixer(nn.Module):
    """Drop-in for a HF attention module: same call, returns (output, None); state lives in the HF cache."""

    def __init__(self, spec: MixerSpec, layer_idx: int):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.padding_mask: torch.Tensor | None = None  # set per forward by the model's pre-hook (1 = real token)
        inner = spec.num_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, inner, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, inner, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, inner, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(inner, spec.hidden_size, bias=False)
        if spec.use_short_conv:
            self.q_conv1d = ShortConvolution(inner, spec.conv_size)
            self.k_conv1d = ShortConvolution(inner, spec.conv_size)
            self.v_conv1d = ShortConvolution(inner, spec.conv_size)
        if spec.use_output_gate:
            self.g_proj = nn.Linear(spec.hidden_size, inner, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        """The decoder layer passes its HF cache as `cache` (transformers >= 5.24) or `past_key_values` (before)."""
        cache = past_key_values if cache is None else cache
        keep = self._keep_mask(hidden_states)
        slot = None if cache is None else state_layer(cache, self.layer_idx)
        fused = self._fused_decode_step(hidden_states, keep, slot)
        if fused is not None:   # the caches were updated in place
            slot.store(slot.conv_caches, slot.recurrent_state, 1)
            return self.o_proj(fused), None
        conv_caches, recurrent_state = (None, None) if slot is None else (slot.conv_caches, slot.recurrent_state)
        kernel_inputs, conv_caches = self._kernel_inputs(hidden_states, keep, conv_caches)
        output, recurrent_state = self._kernel(kernel_inputs, recurrent_state, slot is not None,
                                               slot is not None and slot.state_in_place)
        if slot is not None:
            slot.store(conv_caches, recurrent_state, hidden_states.shape[1])
        return self._finish(output, hidden_states), None

    # -- what a subclass defines: tensor-only maths around its fla kernel (compile_mixers compiles these) ---
    def _kernel_inputs(self, hidden_states, keep, conv_caches):
        """(tuple of the kernel's tensor inputs, new conv caches)."""
        raise NotImplementedError

    def _kernel(self, kernel_inputs, recurrent_state, output_final_state: bool, state_in_place: bool = False):
        """(output [B, T, H, V], final state or None) of the mixer's recurrence; with `state_in_place` the final
        state may be written into `recurrent_state` (a fixed-address cache's buffer) and returned as it."""
        raise NotImplementedError

    def _fused_decode_step(self, hidden_states, keep, slot) -> torch.Tensor | None:
        """A subclass's whole decode step from the layer input to the output projection's input, with the conv
        caches and state of a fixed-address `slot` updated in place; None where it has none for this call."""
        return None

    def _fuses_decode(self, hidden_states, keep, slot, variable: str) -> bool:
        """Whether this call is a decode token that the one-kernel step (decode_step_triton.py, switch `variable`)
        can take: unpadded, without autograd, into a fixed-address cache, with bias-free short convs (or none)."""
        convs = self._convs() if self.spec.use_short_conv else ()
        return (slot is not None and slot.state_in_place and keep is None and hidden_states.shape[1] == 1
                and not torch.is_grad_enabled() and kernels.use_fused_decode(hidden_states, variable)
                and all(conv.bias is None for conv in convs))

    # -- pieces the subclasses combine ---------------------------------------------------------------
    def _keep_mask(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """[B, T] float mask of real tokens for this call, or None when nothing is padded."""
        mask = self.padding_mask
        if mask is None or mask.dim() != 2 or bool(mask.all()):
            return None
        return mask[:, -hidden_states.shape[1]:].to(hidden_states.dtype)

    def _gate_linears(self) -> tuple[nn.Linear, ...]:
        """The subclass's projections of the layer input besides q, k and v (GDN's a and b, GLA's low-rank gate
        factor), which a sequence computes in the same GEMM as q, k and v."""
        return ()

    def _decode_gates(self, hidden_states) -> list[torch.Tensor]:
        """The gate projections of one decode token (a subclass may fuse them with its gate maths)."""
        return [linear(hidden_states) for linear in self._gate_linears()]

    def _project_inputs(self, hidden_states) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([q, k, v] projections, [gate projections]) of the layer input. A sequence runs them all as one GEMM over
        the concatenated weights: one GEMM, and one for each gradient in backward, in place of one per projection
        (the gates' with 9 or 16 outputs, far below what a GEMM needs to run well) plus the adds that summed the
        input's gradient. On an H200 the all-GDN step's GEMMs took 4-5 ms less, its compiled code 2-3 ms more, of
        165 ms (session 15). The output rows are padded to a multiple of PROJECTION_ROW_MULTIPLE: Triton compiles a
        kernel for a row stride divisible by 16 with vector loads, and with one load per element otherwise: our short
        conv's forward, reading q, k and v in place, took 55 us per call on rows of 1752 and 35 us on rows of 1760
        (H200, session 20; compiled layers were not affected, their rows were already aligned). A decode
        token keeps one GEMV per weight: concatenating would copy every weight once more per token, and a decode
        step is bound by reading the weights."""
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        if hidden_states.shape[1] == 1:
            packed = packed_projections(self, hidden_states)   # weights packed once for decoding, if they are
            if packed is not None:
                return list(packed[:3]), list(packed[3:])
            return [linear(hidden_states) for linear in qkv], self._decode_gates(hidden_states)
        projected, widths = self._fused_projection(hidden_states)
        outputs = projected.split(widths, dim=-1)
        return list(outputs[:3]), list(outputs[3:3 + len(self._gate_linears())])

    def input_linears(self) -> tuple[nn.Linear, ...]:
        """q, k, v and the gate projections of the layer input, in the order of the fused GEMM's columns."""
        return (self.q_proj, self.k_proj, self.v_proj) + self._gate_linears()

    def packed_row_padding(self) -> int:
        """Zero rows that round the fused GEMM's output width up to PROJECTION_ROW_MULTIPLE."""
        return -sum(linear.out_features for linear in self.input_linears()) % PROJECTION_ROW_MULTIPLE

    def _fused_projection(self, hidden_states) -> tuple[torch.Tensor, list[int]]:
        """The one GEMM of _project_inputs: [B, T, padded width] and the column widths (q, k, v, gates, padding)."""
        linears = self.input_linears()
        pad = self.packed_row_padding()  # zero rows whose outputs are split off and dropped
        weight, bias = concatenated(linears, pad)
        widths = [linear.out_features for linear in linears] + ([pad] if pad else [])
        return F.linear(hidden_states, weight, bias), widths

    def _project_and_convolve(self, hidden_states, keep, conv_caches):
        """(q, k, v as [B, T, H, D] after the optional short convolutions, [gate projections], new conv caches).
        Where our conv runs (HD_CONV_GRADS_IN_PLACE=on, the default), a training sequence's three convs read the
        fused GEMM's output in place and write their gradients into its gradient (kernels.projected_short_convs)."""
        if not (self.spec.use_short_conv and keep is None and conv_caches is None and hidden_states.shape[1] > 1
                and self.spec.conv_size <= kernels.KERNEL_CONV_MAX_TAPS and kernels.conv_grads_in_place(hidden_states)
                and all(conv.bias is None for conv in self._convs())):
            qkv, gates = self._project_inputs(hidden_states)
            q, k, v, new_caches = self._project_qkv(qkv, keep, conv_caches)
            return q, k, v, gates, new_caches
        projected, widths = self._fused_projection(hidden_states)
        widths = widths[:3 + len(self._gate_linears())]  # the padding's columns get a zero gradient
        outputs = kernels.projected_short_convs(projected, widths, [conv.weight[:, 0] for conv in self._convs()])
        inputs = kernels.column_blocks(projected, widths)
        new_caches = tuple(conv._last_inputs(x) for conv, x in zip(self._convs(), inputs))
        shape = (*hidden_states.shape[:2], self.spec.num_heads, self.spec.head_dim)
        q, k, v = (x.reshape(shape) for x in outputs[:3])
        return q, k, v, list(outputs[3:]), new_caches

    def _convs(self) -> tuple[ShortConvolution, ...]:
        return (self.q_conv1d, self.k_conv1d, self.v_conv1d)

    def _project_qkv(self, projected, keep, conv_caches):
        """q, k, v as [B, T, H, D] from their projections, after the optional short convolutions; padded positions
        zeroed."""
        if keep is not None:
            projected = [x * keep[..., None] for x in projected]
        new_caches = None
        if self.spec.use_short_conv:
            convs = self._convs()
            caches = conv_caches or (None, None, None)
            results = [conv(x, cache) for conv, x, cache in zip(convs, projected, caches)]
            projected = [out for out, _ in results]
            new_caches = tuple(cache for _, cache in results)
            if keep is not None:
                projected = [x * keep[..., None] for x in projected]
        shape = (*projected[0].shape[:2], self.spec.num_heads, self.spec.head_dim)
        q, k, v = (x.reshape(shape) for x in projected)
        return q, k, v, new_caches

    def _finish(self, output, hidden_states):
        """Output norm (gated if configured) per head, then the output projection."""
        gate = None
        if self.spec.use_output_gate:
            gate = self.g_proj(hidden_states).reshape(output.shape)
        output = self.output_norm(output.to(hidden_states.dtype), gate)
        return self.o_proj(output.flatten(-2))

    @property
    def output_norm(self) -> RMSNorm:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, heads={self.spec.num_heads}, head_dim={self.spec.head_dim}"
