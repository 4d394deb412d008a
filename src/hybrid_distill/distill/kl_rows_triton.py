"""Stage 2's KL maths for one chunk of logits in two passes over each row: our Triton kernel (`HD_KL_ROWS=triton`).

It computes what fused_kl._kl_rows computes (each row's KL(teacher || student) at temperature τ, and with a row
scale the gradient (p_S - p_T) * scale), in float32. Inductor's one kernel for that function (maxima, sums of
exponentials, the KL's sum and the gradient, fused) took 0.68 ms per chunk of 4,096 x 49,152 bf16 logits in a
graphed all-GDN step on an H200 (session 21's profile, 5.4 ms of a 140 ms step): about what four reads of both
logits and one write of the gradient cost at the H200's bandwidth, against two reads here. Pass 1 keeps each
softmax's running maximum and sum and the KL's running sum together (online softmax); pass 2 writes the gradient,
walking the row backwards so that it starts with what pass 1 read last, which may still be in L2.

In base 2 (x = logit * log2(e) / τ, m the running maximum, d = Σ 2^(x - m)):
    KL = ln 2 * (Σ 2^(t - m_t) (t - s) / d_t - (m_t + log2 d_t) + (m_s + log2 d_s)).
On CUDA the exponentials are PTX's ex2.approx.ftz (a probability below about 1e-38 becomes 0); under
TRITON_INTERPRET=1 (the CPU tests) tl.exp2.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

__all__ = ["kl_rows"]

# the running maxima's start and masked columns' value: 2^(it - any logit) is 0, never NaN
_NEGATIVE: tl.constexpr = tl.constexpr(-1.0e30)


def _configs(looping: bool = False) -> list[triton.Config]:
    """Columns per iteration, warps and programs per SM: a row of 49,152 bf16 logits is 96 KB per model; each GPU
    picks by timing. PROGRAMS_PER_SM 0 gives each row its own program, so thousands of rows are in flight and pass 2
    finds little of its row in L2 (an H100's profile: 0.61 ms per 4,096-row chunk, what two reads of both logits
    cost from HBM, session 27). With `looping` (HD_KL_ROWS=triton_loop) the candidates also keep 1-4 programs per
    SM looping over the rows, a few MB per SM in flight, so that pass 2 may read its row back from L2 (on an H100
    the kernel took 4.82 ms per step either way, session 28)."""
    one_per_row = [(1024, 4, 0), (2048, 4, 0), (2048, 8, 0), (4096, 8, 0), (4096, 16, 0), (8192, 16, 0)]
    looping_ones = [(2048, 8, 4), (4096, 8, 2), (4096, 16, 1), (8192, 16, 1), (8192, 16, 2)] if looping else []
    return [triton.Config({"BLOCK": block, "PROGRAMS_PER_SM": programs}, num_warps=warps)
            for block, warps, programs in one_per_row + looping_ones]


# The interpreter cannot time candidates: there (and in the tests) the first config runs.
_PLAIN_CONFIG = {"BLOCK": 1024, "PROGRAMS_PER_SM": 0}


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Queried once per device: kl_rows runs once per KL chunk."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _grid(rows: int, device: torch.device):
    """One program per row, or PROGRAMS_PER_SM per SM looping over the rows."""
    sms = _sm_count(device)
    return lambda meta: (min(rows, sms * meta["PROGRAMS_PER_SM"]) if meta["PROGRAMS_PER_SM"] else rows,)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _kl_rows_kernel(s_ptr, t_ptr, kl_ptr, grad_ptr, scale_ptr, rows, V, s_stride, t_stride, grad_stride, scale_stride,
                    log2_scale, WRITE_GRAD: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr,
                    PROGRAMS_PER_SM: tl.constexpr):
    for program_row in range(tl.program_id(0), rows, tl.num_programs(0)):  # once per program without looping
        row = tl.full((), 0, tl.int64) + program_row  # 64-bit offsets (an int under the interpreter)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        offsets = tl.arange(0, BLOCK)
        m_s = tl.full((), _NEGATIVE, tl.float32)
        m_t = tl.full((), _NEGATIVE, tl.float32)
        d_s = tl.zeros((), tl.float32)
        d_t = tl.zeros((), tl.float32)
        weighted = tl.zeros((), tl.float32)  # Σ 2^(t - m_t) (t - s), rescaled with d_t
        for start in range(0, V, BLOCK):
            cols = start + offsets
            mask = cols < V
            s = tl.where(mask, tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * log2_scale, _NEGATIVE)
            t = tl.where(mask, tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * log2_scale, _NEGATIVE)
            m_s_next = tl.maximum(m_s, tl.max(s, 0))
            d_s = d_s * _exp2(m_s - m_s_next, FAST) + tl.sum(_exp2(s - m_s_next, FAST), 0)
            m_s = m_s_next
            m_t_next = tl.maximum(m_t, tl.max(t, 0))
            rescale = _exp2(m_t - m_t_next, FAST)
            e_t = _exp2(t - m_t_next, FAST)
            d_t = d_t * rescale + tl.sum(e_t, 0)
            weighted = weighted * rescale + tl.sum(e_t * (t - s), 0)  # masked columns: 0 * 0
            m_t = m_t_next
        log_z_s = m_s + tl.log2(d_s)
        log_z_t = m_t + tl.log2(d_t)
        tl.store(kl_ptr + row, 0.6931471805599453 * (weighted / d_t - log_z_t + log_z_s))
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            student_factor = scale / d_s
            teacher_factor = scale / d_t
            grad_row = grad_ptr + row * grad_stride
            blocks = tl.cdiv(V, BLOCK)
            for back in range(0, blocks):
                cols = (blocks - 1 - back) * BLOCK + offsets
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * log2_scale
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * log2_scale
                grad = _exp2(s - m_s, FAST) * student_factor - _exp2(t - m_t, FAST) * teacher_factor
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# The gradient may be written over the student's logits (`grad_out`): timing a candidate then overwrites them, so the
# autotuner puts them back after each (only while it times, on a GPU's first call per vocabulary).
_kl_rows_tuned = triton.autotune(configs=_configs(), key=["V", "WRITE_GRAD"], restore_value=["s_ptr"])(_kl_rows_kernel)
_kl_rows_tuned_looping = triton.autotune(configs=_configs(looping=True), key=["V", "WRITE_GRAD"],
                                         restore_value=["s_ptr"])(_kl_rows_kernel)


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            token_weights: torch.Tensor | None, row_scale: torch.Tensor | None,
            grad_dtype: torch.dtype, looping: bool = False, grad_out: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_kl._kl_rows's contract: (Σ_t w_t KL_t as a float32 scalar, ∂L/∂ℓ_S in `grad_dtype` or None).
    `row_scale` is a scalar tensor or one value per row ([rows, 1]); logits are [rows, vocab], half or float32.
    `looping` autotunes among candidates whose programs loop over the rows as well (HD_KL_ROWS=triton_loop).
    `grad_out` ([rows, vocab], `grad_dtype`, rows contiguous) receives the gradient; it may be `student_logits`
    itself: each program reads a block of its row before it writes that block, so the logits' buffer can hold the
    gradient and the chunk needs no third [rows x vocab] buffer."""
    if student_logits.dtype == torch.float64:
        raise ValueError("kl_rows computes in float32: float64 logits take fused_kl's compiled maths")
    student_logits = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    teacher_logits = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    rows, vocab = student_logits.shape
    device = student_logits.device
    per_token = torch.empty(rows, dtype=torch.float32, device=device)
    write_grad = row_scale is not None
    if write_grad:
        grad = torch.empty((rows, vocab), dtype=grad_dtype, device=device) if grad_out is None else grad_out
        if grad.shape != (rows, vocab) or grad.dtype != grad_dtype or grad.stride(-1) != 1:
            raise ValueError(f"grad_out must be a [{rows}, {vocab}] {grad_dtype} tensor with contiguous rows, "
                             f"got {tuple(grad.shape)} {grad.dtype} with strides {grad.stride()}")
        scale = row_scale.reshape(-1).to(torch.float32)
        scale_stride = 0 if scale.numel() == 1 else 1
    else:
        grad, scale, scale_stride = per_token, per_token, 0  # unread pointers
    arguments = (student_logits, teacher_logits, per_token, grad, scale, rows, vocab, student_logits.stride(0),
                 teacher_logits.stride(0), grad.stride(0), scale_stride, math.log2(math.e) / temperature)
    if device.type == "cuda":
        tuned = _kl_rows_tuned_looping if looping else _kl_rows_tuned
        tuned[_grid(rows, device)](*arguments, WRITE_GRAD=write_grad, FAST=True)
    else:  # TRITON_INTERPRET=1
        _kl_rows_kernel[_grid(rows, device)](*arguments, WRITE_GRAD=write_grad, FAST=False, **_PLAIN_CONFIG)
    if token_weights is not None:
        per_token = per_token * token_weights
    return per_token.sum(), grad if write_grad else None
