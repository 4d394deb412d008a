"""One entry point per mixer op: fla's Triton kernels on CUDA, the plain-PyTorch twins everywhere else.

`HD_MIXER_BACKEND=torch` forces the PyTorch path on CUDA too (the GPU equality test compares the two).
A sequence's short convolutions run a Triton kernel on CUDA inside steps that a CUDA graph records
(`graphed_steps`; GRAPHED_SHORT_CONV says whose: ours, short_conv_triton.py), and PyTorch's code elsewhere. In a
graphed all-GDN step on an H200, fla's kernel was 10-13% faster than PyTorch's code and ours 2.7% faster than fla's;
in eager and compiled-but-unrecorded steps, whose host issues every launch, fla's was 9-30% slower
(docs/performance.md, sessions 16 and 19). `HD_SHORT_CONV=fla`, `triton` or `torch` forces one of them everywhere;
`triton` also runs CPU tensors under TRITON_INTERPRET=1, which is how the tests check it. Convs of more than
KERNEL_CONV_MAX_TAPS taps always run PyTorch's code.
`HD_QK_L2NORM=fla` (an experiment, off: +4% alone, nothing on top of fla's conv) has fla's GDN kernel normalise q
and k itself (`use_qk_l2norm_in_kernel`) instead of the compiled code before it. Wherever our conv runs, it writes
q, k and v's gradients straight into the mixer's input-GEMM gradient (short_conv_triton.projected_convs; graphed
all-GDN steps 1.2% faster on an H200, session 21); `HD_CONV_GRADS_IN_PLACE=off` runs the three convs apart
instead. Our conv's kernels walk the sequence row by row (`HD_CONV_KERNELS=rows`: one-pass backward) or in tiles
(`tiles`: the two-pass backward of sessions 19-21). `HD_GDN_KEEP_STATES=on` keeps fla's GDN chunk states for
backward instead of recomputing them (gdn_kept_states.py; on by default: +3.0% on a graphed all-GDN step, H100,
session 26; `off` recomputes). `HD_GDN_DECODE=fused` (the default since session 36) runs a GDN layer's decode step
into a fixed-address cache, from its input projections to its output norm, as one kernel of ours
(decode_step_triton.py); `compiled` runs the compiled mixer maths and fla's recurrent kernel, which then writes
its new state over the old one (recurrent_in_place.py). `HD_GLA_DECODE=fused` does the same for GLA layers (off
until it has run on a GPU).
The switches are read from the environment: set them before the process starts. fla is imported lazily: importing
it costs seconds and it is useless on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import torch_ops

# what a benchmark records beside its numbers: ours, and fla's switch for its FlashQLA backend of GDN
MIXER_OP_SWITCHES = ("HD_MIXER_BACKEND", "HD_SHORT_CONV", "HD_QK_L2NORM", "HD_CONV_GRADS_IN_PLACE",
                     "HD_CONV_KERNELS", "HD_GDN_KEEP_STATES", "HD_GDN_DECODE", "HD_GLA_DECODE", "FLA_FLASH_QLA")
# auto: a kernel inside graphed_steps, else torch
FLA_OP_DEFAULTS = {"HD_SHORT_CONV": "auto", "HD_QK_L2NORM": "torch", "HD_CONV_GRADS_IN_PLACE": "on",
                   "HD_CONV_KERNELS": "rows", "HD_GDN_KEEP_STATES": "on",  # on: +3.0%, H100, session 26
                   "HD_GDN_DECODE": "fused",  # fused: +30% (SmolLM2) and +7.7% (3B) decode, H100, session 36
                   "HD_GLA_DECODE": "compiled"}  # fused: built in session 36, not yet run on a GPU
OP_CHOICES = {"HD_SHORT_CONV": ("auto", "torch", "fla", "triton"), "HD_QK_L2NORM": ("torch", "fla"),
              "HD_CONV_GRADS_IN_PLACE": ("off", "on"), "HD_CONV_KERNELS": ("rows", "tiles"),
              "HD_GDN_KEEP_STATES": ("off", "on"), "HD_GDN_DECODE": ("compiled", "fused"),
              "HD_GLA_DECODE": ("compiled", "fused")}
GRAPHED_SHORT_CONV = "triton"  # the short conv that `auto` records in graphed steps
KERNEL_CONV_MAX_TAPS = 4  # the widest short conv sent to a kernel: the taps short_conv_triton is written for
DECODE_MAX_TOKENS = 64  # below this and without grad, fla's fused recurrent kernel beats the chunked one
_in_graphed_steps = False  # set by graphed_steps()


def mixer_backend() -> str:
    """`HD_MIXER_BACKEND`: auto (fla's kernels on CUDA), torch (the PyTorch path everywhere) or fla (fla's kernels,
    CUDA only)."""
    backend = os.environ.get("HD_MIXER_BACKEND", "auto")
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"HD_MIXER_BACKEND must be auto, torch or fla, not {backend!r}")
    return backend


def use_fla(tensor: torch.Tensor) -> bool:
    backend = mixer_backend()
    if backend == "torch" or not tensor.is_cuda:
        if backend == "fla":
            raise RuntimeError("HD_MIXER_BACKEND=fla needs CUDA tensors")
        return False
    return True


@functools.cache
def _fla_ops():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_gla, fused_recurrent_gla


@contextlib.contextmanager
def graphed_steps():
    """Marks the steps a CUDA graph records (step_graph.GraphedStep's warm-up calls and capture): a replay issues
    the whole step at once, so there the ops pick the kernels that run fastest on the device, not those that are
    cheapest to launch."""
    global _in_graphed_steps
    outer, _in_graphed_steps = _in_graphed_steps, True
    try:
        yield
    finally:
        _in_graphed_steps = outer


def op_choice(variable: str, graphed: bool | None = None) -> str:
    """What the switch `variable` (HD_SHORT_CONV, HD_QK_L2NORM, HD_CONV_GRADS_IN_PLACE, HD_CONV_KERNELS,
    HD_GDN_KEEP_STATES, HD_GDN_DECODE, HD_GLA_DECODE) picks for CUDA tensors here, or in a recorded step if
    `graphed` is given: torch, fla, (the short conv) triton, off/on, rows/tiles, or compiled/fused; unset, the
    switch takes its FLA_OP_DEFAULTS value."""
    choice = os.environ.get(variable, FLA_OP_DEFAULTS[variable])
    allowed = OP_CHOICES[variable]
    if choice not in allowed:
        raise ValueError(f"{variable} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {choice!r}")
    if choice == "auto":
        return GRAPHED_SHORT_CONV if (_in_graphed_steps if graphed is None else graphed) else "torch"
    return choice


def use_kernel_short_conv(x: torch.Tensor) -> bool:
    """Whether the short convolution over the sequence `x` runs a Triton kernel, fla's or ours
    (op_choice("HD_SHORT_CONV")): on CUDA, or for ours under Triton's interpreter on CPU."""
    choice = op_choice("HD_SHORT_CONV")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") == "1":
        return mixer_backend() != "torch"
    return choice in ("fla", "triton") and use_fla(x)


def use_fused_decode(x: torch.Tensor, variable: str) -> bool:
    """Whether a decode token `x` of a GDN (variable HD_GDN_DECODE) or GLA (HD_GLA_DECODE) layer runs
    decode_step_triton's one kernel per layer (`fused`): on CUDA, or on CPU under Triton's interpreter (the tests)."""
    if op_choice(variable) != "fused":
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") == "1":
        return mixer_backend() != "torch"
    return use_fla(x)


def use_fla_qk_l2norm(x: torch.Tensor) -> bool:
    """Whether fla's GDN kernel normalises q and k itself (HD_QK_L2NORM=fla, CUDA)."""
    return op_choice("HD_QK_L2NORM") == "fla" and use_fla(x)


def conv_grads_in_place(x: torch.Tensor) -> bool:
    """Whether a mixer's q, k and v convs over the sequence `x` run as one call of ours that writes their gradients
    into the input GEMM's (HD_CONV_GRADS_IN_PLACE=on, where our conv runs)."""
    return op_choice("HD_CONV_GRADS_IN_PLACE") == "on" and op_choice("HD_SHORT_CONV") == "triton" \
        and use_kernel_short_conv(x)


def column_blocks(tensor: torch.Tensor, widths) -> list[torch.Tensor]:
    """Views of the consecutive column blocks of `tensor` [..., columns] of the given widths, from column 0: the
    projections inside a mixer's fused input-GEMM output (columns past sum(widths) are left out)."""
    return list(tensor[..., :sum(widths)].split(list(widths), dim=-1))


@torch.compiler.disable  # a compiled layer breaks its graph here, as at the mixer's kernel
def projected_short_convs(projected: torch.Tensor, widths: list[int], weights: list[torch.Tensor]):
    """short_conv_triton.projected_convs: the convs over the first len(weights) column blocks of `projected`,
    copies of the other listed blocks."""
    from .short_conv_triton import projected_convs

    return projected_convs(projected, widths, weights)


@torch.compiler.disable  # a compiled layer breaks its graph here, as at the mixer's kernel
def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv(x)) over [B, T, D] from zero history, weight [D, taps] (last tap = the current
    token), with the Triton kernels HD_SHORT_CONV picks: ours (short_conv_triton.py) or fla's (one pass forward,
    the conv recomputed in backward by a second call; only x is kept)."""
    if op_choice("HD_SHORT_CONV") == "triton":
        from .short_conv_triton import conv_silu

        return conv_silu(x, weight, bias)
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d(x=x, weight=weight, bias=bias, activation="silu")[0]


def _decoding(q: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and q.shape[1] <= DECODE_MAX_TOKENS


def gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False, normalize_qk=False,
                     state_in_place=False):
    """Gated delta rule; q and k arrive L2-normalised, or raw with normalize_qk (then normalised here, inside fla's
    kernel on CUDA). Returns (output [B,T,H,V], final state [B,H,K,V] or None). With `state_in_place` the final
    state is written into `initial_state` and returned as that tensor (a fixed-address decode cache's buffer): by
    fla's recurrent kernel itself when it decodes (recurrent_in_place.py), else copied there."""
    if state_in_place:
        if initial_state is None:
            raise ValueError("state_in_place needs the initial state's buffer")
        fits_kernel = initial_state.dtype == torch.float32 and initial_state.is_contiguous()
        if use_fla(q) and _decoding(q) and fits_kernel:
            from .recurrent_in_place import gated_delta_step_in_place

            return gated_delta_step_in_place(q, k, v, g, beta, scale, initial_state, normalize_qk), initial_state
        output, final_state = gated_delta_rule(q, k, v, g, beta, scale, initial_state, True, normalize_qk)
        return output, initial_state.copy_(final_state)
    if not use_fla(q):
        if normalize_qk:
            q, k = torch_ops.l2_normalize(q), torch_ops.l2_normalize(k)
        return torch_ops.gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state)
    if not _decoding(q) and not normalize_qk and op_choice("HD_GDN_KEEP_STATES") == "on":
        from .gdn_kept_states import gated_delta_rule_kept_states

        return gated_delta_rule_kept_states(q, k, v, g, beta, scale, initial_state, output_final_state)
    chunk_op, recurrent_op, _, _ = _fla_ops()
    op = recurrent_op if _decoding(q) else chunk_op
    return op(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, use_qk_l2norm_in_kernel=normalize_qk)


def gated_linear_attention(q, k, v, gk, scale, initial_state=None, output_final_state=False):
    """GLA with per-channel log decays gk; returns (output, final state or None)."""
    if not use_fla(q):
        return torch_ops.gla_chunked(q, k, v, gk, scale, initial_state, output_final_state)
    _, _, chunk_op, recurrent_op = _fla_ops()
    if _decoding(q):
        return recurrent_op(q=q, k=k, v=v, gk=gk, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state)
    return chunk_op(q=q, k=k, v=v, g=gk, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state)
