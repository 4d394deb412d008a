"""Stage-2 KL(teacher || student) from final hidden states, without ever holding [tokens x vocab] logits.

Loss (paper, stage 2), with w_t the token weights (all ones without a mask):
    L = τ² · Σ_t w_t KL(softmax(ℓ_T,t/τ) ‖ softmax(ℓ_S,t/τ)) / Σ_t w_t,   ℓ = hidden @ Wᵀ (+ bias).
Gradient, with p = softmax(ℓ/τ): ∂KL_t/∂ℓ_S,t = (p_S,t − p_T,t)/τ, hence
    ∂L/∂ℓ_S,t = τ · w_t (p_S,t − p_T,t) / Σ_t w_t.
Because L is a sum over tokens, the forward pass computes each chunk's gradient at once and keeps only the
[N, d] and [V, d] results; backward scales them by grad_output. The teacher gets no gradient.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hybrid_distill.distill.precision import active_autocast_dtype

__all__ = ["chunked_kl_from_hidden", "naive_kl"]


def naive_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, token_mask: Tensor | None = None
) -> Tensor:
    """The plain formula on full logits [..., V]: the reference for tests and the benchmark's baseline."""
    _check_temperature(temperature)
    compute_dtype = _compute_dtype(student_logits)
    log_p_student = torch.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    if token_mask is None:
        return temperature**2 * per_token.mean()
    weights = token_mask.to(per_token.dtype)
    return temperature**2 * (per_token * weights).sum() / weights.sum()


def chunked_kl_from_hidden(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    token_mask: Tensor | None = None,
    compiled: bool = False,
) -> Tensor:
    """τ²-scaled mean KL(teacher ‖ student) over (masked) tokens, as a float32 scalar (float64 for fp64 input).

    Hidden states may be [N, d] or [..., N, d] (flattened here); `token_mask` is bool or float with the same
    leading shape. Teacher tensors must not require grad: the teacher is frozen. `compiled` runs each chunk's
    softmax, ratio and gradient maths as one torch.compile'd function (`distill.compile_kl`): the same values,
    in a few fused passes over the [chunk x vocab] logits instead of about twenty (`HD_KL_ROWS=triton`: two passes,
    our kernel).
    """
    _check_temperature(temperature)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    teacher_inputs = {"teacher_hidden": teacher_hidden, "teacher_head_weight": teacher_head_weight,
                      "teacher_head_bias": teacher_head_bias}
    for name, tensor in teacher_inputs.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{name} requires grad, but the teacher is frozen: detach it or use torch.no_grad()")
    leading_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading_shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                         f"{tuple(student_hidden.shape)} differ in their token dimensions")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"student vocab {student_head_weight.shape[0]} != teacher vocab "
                         f"{teacher_head_weight.shape[0]}")
    if token_mask is not None and token_mask.shape != leading_shape:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} must have shape {tuple(leading_shape)}")
    if leading_shape.numel() == 0:
        raise ValueError("chunked_kl_from_hidden got no tokens")

    student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    mask_flat = None if token_mask is None else token_mask.reshape(-1)
    return _ChunkedKL.apply(student_flat, student_head_weight, student_head_bias, teacher_flat,
                            teacher_head_weight, teacher_head_bias, mask_flat, float(temperature), chunk_tokens,
                            torch.is_grad_enabled(), compiled)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                token_mask, temperature, chunk_tokens, grad_enabled, compiled):
        num_tokens = student_hidden.shape[0]
        device = student_hidden.device
        # Under no_grad (held-out evaluation) the per-chunk gradients are skipped entirely.
        wants_grad = tuple(grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        compute_dtype = _compute_dtype(student_hidden)
        # The GEMMs' operands are cast once here, the heads for every chunk: to the autocast dtype where autocast
        # would cast them at each GEMM anyway (the same values, without a float32 copy of each head cast back at
        # every chunk), else upcast to the compute dtype.
        gemm_dtype = _gemm_dtype(compute_dtype, device)
        wide_student_weight = student_weight.to(gemm_dtype)
        wide_teacher_weight = teacher_weight.to(gemm_dtype)
        wide_student_bias = None if student_bias is None else student_bias.to(gemm_dtype)
        wide_teacher_bias = None if teacher_bias is None else teacher_bias.to(gemm_dtype)

        if token_mask is None:
            token_weights = None
            weight_total = torch.full((), float(num_tokens), dtype=compute_dtype, device=device)  # no host copy
        else:
            token_weights = token_mask.to(device=device, dtype=compute_dtype)
            weight_total = token_weights.sum()
        # An all-masked batch contributes nothing rather than 0/0.
        inverse_total = torch.where(weight_total > 0, 1.0 / weight_total, torch.zeros_like(weight_total))

        loss_sum = torch.zeros((), dtype=compute_dtype, device=device)
        grad_hidden = torch.empty_like(student_hidden) if wants_grad[0] else None
        wide_grad_weight = torch.zeros_like(student_weight, dtype=compute_dtype) if wants_grad[1] else None
        wide_grad_bias = torch.zeros_like(student_bias, dtype=compute_dtype) if wants_grad[2] else None

        # Under autocast the gradient matmuls below run in its dtype: the compiled maths hand it over already cast.
        grad_dtype = active_autocast_dtype(device.type) or compute_dtype
        for start in range(0, num_tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, num_tokens))
            wide_hidden = student_hidden[rows].to(gemm_dtype)
            row_scale = None
            if any(wants_grad):
                row_scale = temperature * inverse_total
                if token_weights is not None:
                    row_scale = (row_scale * token_weights[rows]).unsqueeze(-1)
            chunk_weights = None if token_weights is None else token_weights[rows]
            if compiled:
                kernel = _our_kernel(compute_dtype, device)
                student_logits = _logits(wide_hidden, wide_student_weight, wide_student_bias)
                if kernel is not None:
                    chunk_loss, grad_logits = _kernel_chunk(
                        kernel, student_logits, teacher_hidden[rows].to(gemm_dtype), wide_teacher_weight,
                        wide_teacher_bias, temperature, chunk_weights, row_scale, grad_dtype)
                else:
                    chunk_loss, grad_logits = _compiled_kl_rows()(
                        student_logits,
                        _logits(teacher_hidden[rows].to(gemm_dtype), wide_teacher_weight, wide_teacher_bias),
                        temperature, chunk_weights, row_scale, grad_dtype)
                del student_logits  # a chunk's gradient may live in its buffer; it is freed with grad_logits
                loss_sum += chunk_loss
            else:
                log_p_student = _scaled_log_softmax(wide_hidden, wide_student_weight, wide_student_bias, temperature)
                log_p_teacher = _scaled_log_softmax(teacher_hidden[rows].to(gemm_dtype), wide_teacher_weight,
                                                    wide_teacher_bias, temperature)
                log_ratio = log_p_teacher - log_p_student
                p_teacher = log_p_teacher.exp_()
                per_token = log_ratio.mul_(p_teacher).sum(dim=-1)
                del log_ratio
                if chunk_weights is not None:
                    per_token = per_token * chunk_weights
                loss_sum += per_token.sum()
                grad_logits = None if row_scale is None else log_p_student.exp_().sub_(p_teacher).mul_(row_scale)
                del log_p_student, log_p_teacher, p_teacher

            if grad_logits is not None:
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_logits @ wide_student_weight).to(grad_hidden.dtype)
                if wide_grad_weight is not None:
                    _add_weight_grad(wide_grad_weight, grad_logits, wide_hidden)
                if wide_grad_bias is not None:
                    wide_grad_bias += grad_logits.sum(dim=0)
            # Freed before the next chunk's logits are made, so that two chunks' buffers are never held at once.
            del grad_logits

        ctx.save_for_backward(
            grad_hidden,
            None if wide_grad_weight is None else wide_grad_weight.to(student_weight.dtype),
            None if wide_grad_bias is None else wide_grad_bias.to(student_bias.dtype),
        )
        return temperature**2 * loss_sum * inverse_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if grad is None else grad * grad_output.to(grad.dtype)
                  for grad in (grad_hidden, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None, None, None, None, None)


def _add_weight_grad(accumulator: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """accumulator += grad_logitsᵀ @ hidden, the sum over chunks kept in float32. With half-precision operands on
    CUDA one GEMM adds its float32 result straight into the accumulator (cuBLAS's beta = 1), where the product
    would otherwise be written in half precision and added back by another kernel (8 float32 adds of the head's
    size, 0.9 ms of an H100 step). Elsewhere out of place, so that autocast runs it on tensor cores: an in-place
    addmm_ of float32 operands stays a SIMT GEMM (8 of them were 7% of an H100 stage-2 step)."""
    half = (torch.bfloat16, torch.float16)  # HD_KL_HEADS=float32 hands float32 rows: the old form
    if (accumulator.is_cuda and accumulator.dtype == torch.float32 and grad_logits.dtype in half
            and hidden.dtype == grad_logits.dtype and _accumulating_gemm_works(accumulator.device)):
        torch.addmm(accumulator, grad_logits.T, hidden, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator += grad_logits.T @ hidden


@functools.cache
def _accumulating_gemm_works(device: torch.device) -> bool:
    """Whether this torch adds a bf16 GEMM's float32 result into its float32 `out` in place (addmm's out_dtype;
    older releases lack it or refuse a float32 input beside bf16 operands): checked once per device on a 2 x 2
    case with a known answer, outside any graph capture (the first step is an eager warm-up)."""
    accumulator = torch.ones(2, 2, device=device)
    two = torch.eye(2, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(accumulator, two, 2 * two, out_dtype=torch.float32, out=accumulator)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.equal(accumulator, torch.tensor([[3.0, 1.0], [1.0, 3.0]], device=device)))


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float, token_weights: Tensor | None,
             row_scale: Tensor | None, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One chunk's Σ_t w_t KL_t and, with `row_scale`, ∂L/∂ℓ_S (in `grad_dtype`): the maths `compiled` fuses."""
    compute_dtype = _compute_dtype(student_logits)
    log_p_student = torch.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    per_token = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=-1)
    if token_weights is not None:
        per_token = per_token * token_weights
    if row_scale is None:
        return per_token.sum(), None
    return per_token.sum(), ((log_p_student.exp() - p_teacher) * row_scale).to(grad_dtype)


KL_ROWS_CHOICES = ("compiled", "triton", "triton_loop")


def kl_rows_choice() -> str:
    """`HD_KL_ROWS`: whose kernel runs the chunk maths under `compiled` (distill.compile_kl): ours (`triton`, the
    default; kl_rows_triton.py: two passes over the logits, where Inductor's kernel took about four passes' time:
    +1.7% on a graphed all-GDN step, H100, session 26), ours with candidates whose programs loop over the rows among
    those it autotunes (`triton_loop`, session 27: no faster on an H100, session 28), or Inductor's (`compiled`).
    Set it before the process starts."""
    choice = os.environ.get("HD_KL_ROWS", "triton")
    if choice not in KL_ROWS_CHOICES:
        raise ValueError(f"HD_KL_ROWS must be one of {', '.join(KL_ROWS_CHOICES)}, not {choice!r}")
    return choice


def _our_kernel(compute_dtype: torch.dtype, device: torch.device):
    """The chunk maths `compiled` runs: kl_rows_triton.kl_rows with HD_KL_ROWS's candidates, or None where
    Inductor's maths (_compiled_kl_rows) run instead. Ours runs on CUDA, and on CPU under TRITON_INTERPRET=1 (the
    tests); it computes in float32, so float64 logits keep Inductor's, as does a CPU without the interpreter."""
    runs_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    choice = kl_rows_choice()
    if choice != "compiled" and runs_triton and compute_dtype != torch.float64:
        from hybrid_distill.distill.kl_rows_triton import kl_rows

        return functools.partial(kl_rows, looping=choice == "triton_loop")
    return None


def _kernel_chunk(kernel, student_logits: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                  teacher_bias: Tensor | None, temperature: float, token_weights: Tensor | None,
                  row_scale: Tensor | None, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One chunk through our kernel with two of its three [rows x vocab] buffers made smaller: the gradient is
    written over the student's logits (read there for the last time), and the teacher's logits are made
    `kl_teacher_rows()` rows at a time. The step's memory peaks inside the KL, with every layer's activations still
    held, so each byte of the chunk's working set counts there: at 4,096 rows of a 49,152-token vocabulary in bf16,
    three buffers of 0.4 GB become one and a quarter (an H100 step's peak: docs/performance.md, session 35). The
    student's logits stay whole: the weight gradient's GEMM sums over the chunk's
    rows, and fewer, longer sums cost less (each adds into the float32 gradient of the head)."""
    rows = student_logits.shape[0]
    if row_scale is None:
        grad = None
    elif student_logits.dtype == grad_dtype and student_logits.is_contiguous():
        grad = student_logits
    else:
        grad = torch.empty_like(student_logits, dtype=grad_dtype)
    part_rows = kl_teacher_rows() or rows
    loss = None
    for start in range(0, rows, part_rows):
        part = slice(start, min(start + part_rows, rows))
        teacher_logits = _logits(teacher_hidden[part], teacher_weight, teacher_bias)
        part_scale = row_scale if row_scale is None or row_scale.dim() == 0 else row_scale[part]
        part_loss, _ = kernel(student_logits[part], teacher_logits, temperature,
                              None if token_weights is None else token_weights[part], part_scale, grad_dtype,
                              grad_out=None if grad is None else grad[part])
        del teacher_logits  # before the next part's logits are made
        loss = part_loss if loss is None else loss + part_loss
    return loss, grad


KL_TEACHER_ROWS_DEFAULT = 1024


def kl_teacher_rows() -> int:
    """`HD_KL_TEACHER_ROWS`: the teacher's logits rows made at a time inside each KL chunk under our kernel (default
    1,024; 0 makes the whole chunk at once, as before session 35). Set it before the process starts."""
    value = os.environ.get("HD_KL_TEACHER_ROWS", str(KL_TEACHER_ROWS_DEFAULT))
    if not value.isdigit():
        raise ValueError(f"HD_KL_TEACHER_ROWS must be a whole number of rows (0: the whole chunk), not {value!r}")
    return int(value)


@functools.cache
def _compiled_kl_rows():
    """Compiled once per process (and per chunk shape by Dynamo): the last, shorter chunk gets its own graph."""
    return torch.compile(_kl_rows, dynamic=False)


def _scaled_log_softmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = _logits(hidden, weight, bias)
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


KL_HEADS_CHOICES = ("autocast", "float32")


def kl_heads_choice() -> str:
    """`HD_KL_HEADS`: what the head GEMMs' operands are cast to before the chunks, under autocast. `autocast` (the
    default, session 28): its dtype, once, and the weight gradient's chunks added in float32 inside their GEMMs;
    `float32` (before session 28, kept to time the change): float32 copies, which autocast casts back at every
    chunk's GEMMs, and each bf16 product added by a kernel of its own. Set it before the process starts."""
    choice = os.environ.get("HD_KL_HEADS", "autocast")
    if choice not in KL_HEADS_CHOICES:
        raise ValueError(f"HD_KL_HEADS must be one of {', '.join(KL_HEADS_CHOICES)}, not {choice!r}")
    return choice


def _gemm_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the head GEMMs run in: autocast's where it would cast their float32 operands, else `compute_dtype`
    (float64 and no autocast keep it)."""
    choice, autocast_dtype = kl_heads_choice(), active_autocast_dtype(device.type)
    if autocast_dtype is None or compute_dtype != torch.float32 or choice == "float32":
        return compute_dtype
    return autocast_dtype


def _compute_dtype(reference: Tensor) -> torch.dtype:
    """float32 for half-precision and fp32 input; float64 stays float64 so that gradcheck is exact."""
    return torch.promote_types(reference.dtype, torch.float32)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
