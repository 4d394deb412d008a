"""One GEMM for the projections that read the same input: a softmax attention's q, k and v, an MLP's gate and up
(`HD_MERGED_PROJECTIONS=on` or `forward`; off by default).

Why it was tried: at SmolLM2 widths the separate GEMMs are small (k and v are 576 x 192) and run below the GPU's
matmul rate; in the graphed all-softmax step on an H100 the small GEMMs took about 7 ms of 114 (session 28's
profile). One GEMM over the concatenated weights does the same sums in fewer, larger tiles. Measured there: the
GEMMs took 5.7 ms less, but the compiled backward 3.9 ms more (it writes q, k and v's gradients, and gate's and
up's, into one concatenated gradient), so the step gained 0.2-0.4% for 1.5 GB more peak memory: off by default. It
may pay at wider shapes (3B teachers' k and v are 3072 x 1024), not yet timed.

`forward` (session 29) keeps the one GEMM in the forward only, for student and teacher, where it saved the most
(the separate layout's small k and v GEMMs), and gives the backward no cat at all: each projection's gradient GEMMs
run on their own, and the input's gradient is summed inside them, in place (`accumulate_mm`: cuBLAS adds the running
sum in its epilogue). Timed on an H100 with an out-of-place addmm (session 30): -1.5%, the GEMMs and compiled
kernels 1.1 ms faster but 2.2 ms of copies of the running sum added; the in-place sum is not yet timed. In session 28's profile of the separate layout, a 3-input and a 2-input add kernel (30 calls each,
2.4 and 1.8 ms) look like those sums done outside the GEMMs.

The weights stay separate parameters, so module names, the state dict and checkpoints are unchanged: each forward
concatenates them (1-3 MB per layer, fused by the compiled layer) and splits the output. Only training forwards
change (no cache; decoding keeps HF's forward), and only the classes whose forward this module restates: Llama's
and Qwen2's attention and MLP (Qwen3's attention normalises q and k between projection and rotary, so it keeps
its own).
"""
from __future__ import annotations

import os
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hybrid_distill.distill.precision import active_autocast_dtype
from hybrid_distill.models.student import decoder_layers

MERGED_ATTENTION = ("LlamaAttention", "Qwen2Attention")
MERGED_MLP = ("LlamaMLP", "Qwen2MLP")
MERGED_PROJECTIONS_CHOICES = ("on", "forward", "off")


def merged_projections_choice() -> str:
    """`HD_MERGED_PROJECTIONS`: on (one GEMM forward and backward), forward (one GEMM forward only) or off (the
    default). Set it before the process starts."""
    choice = os.environ.get("HD_MERGED_PROJECTIONS", "off")
    if choice not in MERGED_PROJECTIONS_CHOICES:
        raise ValueError(f"HD_MERGED_PROJECTIONS must be on, forward or off, not {choice!r}")
    return choice


def merge_input_projections(model: nn.Module) -> int:
    """With `HD_MERGED_PROJECTIONS=on` or `forward`, has every Llama/Qwen2 attention and MLP of `model` compute its
    input projections as one GEMM (in place, per module: call it before compiling the layers); returns how many
    modules changed (none when off)."""
    choice = merged_projections_choice()
    if choice == "off":
        return 0
    projections = forward_merged_linear if choice == "forward" else merged_linear
    changed = 0
    for layer in decoder_layers(model):
        for module, names, forward in ((getattr(layer, "self_attn", None), ("q_proj", "k_proj", "v_proj"),
                                        _attention_forward),
                                       (getattr(layer, "mlp", None), ("gate_proj", "up_proj"), _mlp_forward)):
            if mergeable(module, names):
                module.forward = types.MethodType(forward, module)
                module.merged_projections = projections  # how its forward computes them
                changed += 1
    return changed


def mergeable(module, names) -> bool:
    """A module of a class this file restates, whose projections are plain linears that all have a bias or none."""
    if type(module).__name__ not in MERGED_ATTENTION + MERGED_MLP:
        return False
    linears = [getattr(module, name, None) for name in names]
    return (all(type(linear) is nn.Linear for linear in linears)
            and len({linear.bias is None for linear in linears}) == 1
            and len({linear.in_features for linear in linears}) == 1)


def merged_linear(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
    """(linear(x) for linear in linears), computed as one GEMM over their concatenated weights."""
    return _one_gemm(x, *_weights_and_biases(linears))


def _weights_and_biases(linears) -> tuple[list, list]:
    """The linears' weights, and their biases (none where they have none: `mergeable` allows all or none)."""
    return [linear.weight for linear in linears], [linear.bias for linear in linears if linear.bias is not None]


def _one_gemm(x: torch.Tensor, weights, biases) -> tuple[torch.Tensor, ...]:
    output = F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)
    return output.split([weight.shape[0] for weight in weights], dim=-1)


def forward_merged_linear(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
    """merged_linear's values, with _ForwardMerged's backward (the `forward` choice). Autocast's casts are made here,
    outside the Function, as F.linear would make them: the Function runs in one dtype, its backward needs no
    autocast."""
    weights, biases = _weights_and_biases(linears)
    dtype = active_autocast_dtype(x.device.type)
    if dtype is not None:
        x, weights, biases = x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    return _ForwardMerged.apply(x, len(weights), *weights, *biases)


@torch.library.custom_op("hybrid_distill::accumulate_mm", mutates_args=("total",))
def accumulate_mm(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, in place: the GEMM adds `total` in its epilogue (cuBLAS's beta = 1). An operator of its own
    because a compiled `torch.addmm(total, a, b)` writes into a new buffer, and ATen first copies `total` there:
    98 copies, 2.2 ms of an all-softmax step on an H100 (session 30). Compiled, the mutation stays in place when
    nothing else reads `total`, as here."""
    total.addmm_(a, b)


@accumulate_mm.register_fake
def _accumulate_mm_shapes(total, a, b) -> None:
    return None


class _ForwardMerged(torch.autograd.Function):
    """y_i = x W_i^T (+ b_i) as one GEMM over the concatenated weights; backward per projection: dW_i = dy_i^T x,
    and dx = sum_i dy_i W_i with each term added to the running sum in its GEMM (addmm), so no gradient is ever
    concatenated and no kernel adds GEMM outputs."""

    @staticmethod
    def forward(ctx, x, count, *weights_and_biases):
        weights, biases = weights_and_biases[:count], weights_and_biases[count:]
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bool(biases)
        return _one_gemm(x, weights, biases)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_x, grad_weights, grad_biases = None, [], []
        for grad, weight in zip(grads, weights):
            grad = grad.reshape(-1, grad.shape[-1])
            if grad_x is None:
                grad_x = grad @ weight
            else:
                accumulate_mm(grad_x, grad, weight)
            grad_weights.append(grad.t() @ rows)
            if ctx.has_bias:
                grad_biases.append(grad.sum(0))
        return (grad_x.view(x.shape), None, *grad_weights, *grad_biases)


def _mlp_forward(self, x):
    gate, up = self.merged_projections(x, (self.gate_proj, self.up_proj))
    return self.down_proj(self.act_fn(gate) * up)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """HF's Llama/Qwen2 attention forward for a training step, with q, k and v from one GEMM; with a cache (or
    without rotary tables) the class's own forward runs."""
    cache = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    if any(item is not None for item in cache) or position_embeddings is None:
        if cache[0] is not None:
            kwargs["cache"] = cache[0]
        if cache[1] is not None:
            kwargs["past_key_values"] = cache[1]
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    projected = self.merged_projections(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    return attend(self, sys.modules[type(self).__module__], projected, hidden_states.shape[:-1], position_embeddings,
                  attention_mask, kwargs)


def attend(self, modeling, projected, input_shape, position_embeddings, attention_mask, kwargs, update_cache=None):
    """The rest of HF's Llama/Qwen2 attention forward from the q, k and v projections (`modeling`: the class's
    module, for its rotary and eager attention): rotary, `update_cache(key, value)` if given (it returns the keys
    and values to attend to), the attention function the config names, the output projection."""
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (states.view(hidden_shape).transpose(1, 2) for states in projected)
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    if update_cache is not None:
        key, value = update_cache(key, value)
    attention = _attention_function(self.config._attn_implementation, modeling.eager_attention_forward)
    if getattr(self, "sliding_window", None) is not None:
        kwargs["sliding_window"] = self.sliding_window
    output, weights = attention(self, query, key, value, attention_mask,
                                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _attention_function(implementation: str, eager):
    """The attention function HF's forward would call for `implementation`."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
