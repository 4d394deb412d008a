"""`HD_FUSED_ADD_NORM=on` (off by default until an H100 times it): each Llama/Qwen2 decoder layer's residual add
after attention and the RMS norm before its MLP run as one operator, `hybrid_distill::add_rms_norm`, which compiled
layers call as an opaque kernel (Triton on CUDA, add_norm_triton.py; the same maths in PyTorch on CPU).

Why: Inductor's backward for that norm reads the MLP's input gradient, the layer's input and the attention's output
(to recompute the sum) and the residual's gradient for the input's gradient, then the first three again for the
weight's; the operator's backward reads the output's gradient, the saved sum and the residual's gradient once for
both. With `HD_MERGED_PROJECTIONS=on` the output's gradient comes from one GEMM; with separate gate and up
projections Inductor first sums their two gradients. The layer's first norm stays with Inductor, which fuses it
into the residual's gradient sum.
"""
from __future__ import annotations

import os
import types

import torch
from torch import nn

from hybrid_distill.models.student import decoder_layers

SWITCH = "HD_FUSED_ADD_NORM"
FUSED_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer")  # whose forward _decoder_layer_forward restates


def fused_add_norm_choice() -> str:
    """`HD_FUSED_ADD_NORM`: on or off (the default)."""
    choice = os.environ.get(SWITCH, "off")
    if choice not in ("on", "off"):
        raise ValueError(f"{SWITCH} must be on or off, not {choice!r}")
    return choice


def fuse_add_norms(model: nn.Module) -> int:
    """With `HD_FUSED_ADD_NORM=on`, has every Llama/Qwen2 decoder layer of `model` (softmax or linear mixer alike)
    run its post-attention add and norm as one operator (in place: call it before compiling the layers); returns
    how many layers changed (none when off)."""
    if fused_add_norm_choice() == "off":
        return 0
    changed = 0
    for layer in decoder_layers(model):
        if type(layer).__name__ in FUSED_LAYERS:
            layer.forward = types.MethodType(_decoder_layer_forward, layer)
            changed += 1
    return changed


def _decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                           position_embeddings=None, **kwargs):
    """HF's Llama/Qwen2 decoder layer (transformers 5) with the add and norm before the MLP as one operator."""
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    normed, residual, _ = add_rms_norm(hidden_states, attended, norm.weight, norm.variance_epsilon)
    return residual + self.mlp(normed)


@torch.library.custom_op("hybrid_distill::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight * rms_norm(x + a), x + a, 1 / rms of each row of x + a) as HF's RMS norm computes them."""
    if x.is_cuda:
        from hybrid_distill.distill.add_norm_triton import add_rms_norm_forward

        return add_rms_norm_forward(x.contiguous(), a.contiguous(), weight, eps)
    total = x + a
    rows = total.float()
    rstd = torch.rsqrt(rows.pow(2).mean(-1) + eps)
    return weight * (rows * rstd[..., None]).to(total.dtype), total, rstd


@add_rms_norm.register_fake
def _add_rms_norm_shapes(x, a, weight, eps):
    total = torch.promote_types(x.dtype, a.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, total)), x.new_empty(x.shape, dtype=total),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("hybrid_distill::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(dy: torch.Tensor, ds: torch.Tensor | None, total: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gradient of x + a, the weight's) from the output's gradient `dy` and the sum's own `ds` (or None)."""
    if total.is_cuda:
        from hybrid_distill.distill import add_norm_triton

        return add_norm_triton.add_rms_norm_backward(dy.contiguous(), None if ds is None else ds.contiguous(),
                                                     total, rstd, weight)
    rows = total.float()
    normed = rows * rstd[..., None]
    grad = dy.float()
    d_weight = (grad * normed.to(total.dtype).float()).reshape(-1, total.shape[-1]).sum(0)
    scaled = grad * weight.float()
    d_total = (scaled - normed * (scaled * normed).mean(-1, keepdim=True)) * rstd[..., None]
    if ds is not None:
        d_total = d_total + ds.float()
    return d_total.to(total.dtype), d_weight.to(weight.dtype)


@add_rms_norm_backward.register_fake
def _add_rms_norm_backward_shapes(dy, ds, total, rstd, weight):
    return torch.empty_like(total), torch.empty_like(weight)


def _save_for_backward(ctx, inputs, output):
    x, a, weight, _ = inputs
    _, total, rstd = output
    ctx.save_for_backward(total, rstd, weight)
    ctx.input_dtypes = (x.dtype, a.dtype)


def _backward(ctx, dy, ds, _):
    total, rstd, weight = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(total)
    d_total, d_weight = add_rms_norm_backward(dy, ds, total, rstd, weight)
    x_dtype, a_dtype = ctx.input_dtypes
    return d_total.to(x_dtype), d_total.to(a_dtype), d_weight, None


add_rms_norm.register_autograd(_backward, setup_context=_save_for_backward)
