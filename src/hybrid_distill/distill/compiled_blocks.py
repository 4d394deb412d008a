"""torch.compile of the elementwise-heavy parts of a model, leaving fla's kernels to themselves: at small hidden
sizes a training step is bound by many small elementwise kernels (norm, SiLU-gate, casts, rotary, transposes,
gates, residual adds), which the compiler fuses.

Two granularities: whole decoder layers for training (`compile_training_layers`, what distill.compile_blocks
runs), and per-block (MLPs, norms, softmax attention, mixer maths: `compile_student`) for decoding, whose cache
bookkeeping must stay outside the compiled code so that CUDA-graphed steps reuse one graph.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from hybrid_distill.models.mixers import LinearMixer
from hybrid_distill.models.student import decoder_layers, mixers_of

DENSE_BLOCKS = ("mlp", "input_layernorm", "post_attention_layernorm")


def compile_dense_blocks(model: nn.Module) -> int:
    """Compile (in place, so names and the state dict are unchanged) every layer's MLP and norms and the final
    norm of `model`; returns how many modules. Shapes are static in training, so no dynamic-shape guards."""
    modules = [getattr(layer, name) for layer in decoder_layers(model) for name in DENSE_BLOCKS
               if isinstance(getattr(layer, name, None), nn.Module)] + _final_norm(model)
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


def compile_mixers(model: nn.Module) -> int:
    """Compile the tensor maths of every linear mixer of `model` in place (projections, short convs, gates,
    norms); fla's kernel call and the cache bookkeeping stay outside the compiled code, which is then the same
    pure function for training and decoding steps. Returns how many mixers."""
    mixers = list(mixers_of(model).values())
    for mixer in mixers:
        mixer._kernel_inputs = torch.compile(mixer._kernel_inputs, dynamic=False)
        mixer._finish = torch.compile(mixer._finish, dynamic=False)
    return len(mixers)


def compile_softmax_attention(model: nn.Module) -> int:
    """Compile every softmax attention module of `model` in place (SDPA itself stays ATen's kernel inside the
    graph); returns how many. Eager, their rotary embedding, casts and transposes were among the many small
    kernels left in a compiled-blocks all-softmax step's profile (docs/performance.md)."""
    modules = [layer.self_attn for layer in decoder_layers(model) if not isinstance(layer.self_attn, LinearMixer)]
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


def compile_student(model: nn.Module) -> int:
    """Per-block compile for decoding (bench_inference.py): dense blocks, softmax attention and mixer maths, with
    the cache bookkeeping left eager; returns how many modules were compiled. Training uses
    `compile_training_layers`."""
    return compile_dense_blocks(model) + compile_softmax_attention(model) + compile_mixers(model)


def compile_training_layers(model: nn.Module, budgeted_layers: int = 0, memory_budget: float = 1.0) -> int:
    """`distill.compile_blocks`: compile (in place) every decoder layer's forward of `model` as a whole, so that
    the norms, the residual adds and the attention's or mixer's maths around them fuse, and the final norm;
    returns how many modules. A mixer's fla kernel call is excluded (`torch.compiler.disable`): the layer's
    graph breaks there into the part before the kernel and the part after it (and at fla's short conv, when
    a graphed step runs it). One compiled code serves all layers of a kind (parameters are graph inputs); the
    teacher (no grad), softmax and mixer layers are its variants. The first `budgeted_layers` layers compile
    under `memory_budget` (distill.activation_memory_budget_layers), the rest under the process-wide budget.

    Call it before `recompute_decoder_layers`: the recomputation then wraps the compiled forward and reruns it in
    backward, where a checkpoint traced inside a compiled layer would break the layer's graph at the checkpoint."""
    tune_generated_kernels()
    layers = decoder_layers(model)
    budgeted = budgeted_inductor(memory_budget) if budgeted_layers > 0 else None
    for index, layer in enumerate(layers):
        if isinstance(layer.self_attn, LinearMixer):
            layer.self_attn._kernel = torch.compiler.disable(layer.self_attn._kernel)
        backend = budgeted if index < budgeted_layers else "inductor"
        layer.forward = torch.compile(layer.forward, dynamic=False, backend=backend)
    final_norm = _final_norm(model)
    for norm in final_norm:
        norm.compile(dynamic=False)
    return len(layers) + len(final_norm)


COORDINATE_DESCENT_SWITCH = "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"


def tune_generated_kernels() -> bool:
    """Has Inductor time the launch configs of each kernel it generates (coordinate-descent tuning), unless the
    user's TORCHINDUCTOR_COORDINATE_DESCENT_TUNING says otherwise; returns whether it is on. Why: the compiled norms
    ran at a third to a half of the memory rate; tuned, the graphed stage-2 step on an H100 gained 0.7-1.1%
    all-softmax and 0.8% all-GDN (session 30). The tuning is paid once per kernel and shape: its choices live in
    the kernel cache that a run's jobs share. Process-wide, like Inductor's own switches."""
    import torch._inductor.config as inductor_config

    if COORDINATE_DESCENT_SWITCH not in os.environ:
        inductor_config.coordinate_descent_tuning = True
    return bool(inductor_config.coordinate_descent_tuning)


def set_activation_memory_budget(fraction: float) -> None:
    """What share of a compiled graph's activations its backward may keep (distill.activation_memory_budget): below
    1, the compiler's partitioner recomputes the cheapest saved values in backward (pointwise maths first, fused into
    the backward's kernels) until the rest fit, a finer trade than recomputing whole layers. Process-wide (a job is
    one process) and read when a graph compiles, so set it before the first step."""
    torch._functorch.config.activation_memory_budget = _checked_budget(fraction)


def _checked_budget(fraction: float) -> float:
    """`fraction` as a float, or a ValueError naming activation_memory_budget if it is outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"activation_memory_budget must be in (0, 1], got {fraction}")
    return float(fraction)


def budgeted_inductor(fraction: float):
    """A torch.compile backend: Inductor with the partitioner's activation budget at `fraction` while it compiles,
    so that only the code compiled through it recomputes. Why per layer: every budget from 0.8 to 0.99 gives the
    partitioner's same plan (its cheap pointwise values recomputed; 21.0 -> 16.1 GB on an H100 at 64 x 512, -1.7%,
    session 33), so a memory target between the two is reached by giving that plan to some of the layers only.
    Dynamo keys compiled code by its backend too, so these layers never share code compiled under another budget."""
    fraction = _checked_budget(fraction)
    from torch._inductor.compile_fx import compile_fx

    def compile_within_budget(graph, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=fraction):
            return compile_fx(graph, example_inputs)
    return compile_within_budget


def _final_norm(model: nn.Module) -> list[nn.Module]:
    """The model's final norm as a list of at most one module (some bodies have none)."""
    norm = getattr(getattr(model, "model", model), "norm", None)
    return [norm] if isinstance(norm, nn.Module) else []
