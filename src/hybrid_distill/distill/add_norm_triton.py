"""The residual add and RMS norm before a decoder layer's MLP, forward and backward, as two Triton kernels
(`HD_FUSED_ADD_NORM=on`, fused_add_norm.py holds the operator around them).

Why: compiled by Inductor, this norm's backward runs as a kernel for the input's gradient and separate reductions
for the weight's, each reading the same activations, at about half the memory rate on an H100 (sessions 29-31). The
backward here reads the output's gradient, the saved sum and the residual's gradient once and writes the input's
gradient and one partial weight gradient per program; the forward reads both inputs once and writes the sum, the
normalised output and each row's 1 / rms.

Numerics follow HF's LlamaRMSNorm: the sum rounded to its dtype, its mean square in float32, the normalised row
rounded to the sum's dtype before the weight multiplies it. Rows are the last dimension, contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid_distill.distill.sm_count import sm_count

__all__ = ["add_rms_norm_forward", "add_rms_norm_backward"]

ROWS = 4  # rows per block at most: a few KB per program in flight at SmolLM2's 576 columns
BLOCK_ELEMENTS = 4096  # at most per block, so that wide rows (3B models' 3,072) keep their registers
PROGRAMS_PER_SM = 4  # backward: programs looping over the row blocks, each keeping one partial weight gradient


def _block(columns: int) -> tuple[int, int, int]:
    """(rows per block, columns per block, warps): a block spans whole rows."""
    block = triton.next_power_of_2(columns)
    return max(1, min(ROWS, BLOCK_ELEMENTS // block)), block, 4 if block <= 512 else 8 if block <= 2048 else 16


@triton.jit
def _forward_kernel(x_ptr, a_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, rows, columns, eps,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows_here = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row = rows_here[:, None]
    column = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (column < columns)
    offset = row * columns + column
    x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    s = (x + a).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + offset, s, mask=mask)
    s = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / columns + eps)
    tl.store(rstd_ptr + rows_here, rstd, mask=rows_here < rows)
    normed = (s * rstd[:, None]).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + column, mask=column < columns, other=0.0).to(tl.float32)
    tl.store(y_ptr + offset, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, ds_ptr, s_ptr, rstd_ptr, w_ptr, dx_ptr, dw_ptr, rows, columns,
                     HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    column = tl.arange(0, BLOCK)[None, :]
    w = tl.load(w_ptr + column, mask=column < columns, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for first in range(program * ROWS, rows, programs * ROWS):
        row = first + tl.arange(0, ROWS)[:, None]
        mask = (row < rows) & (column < columns)
        offset = row * columns + column
        dy = tl.load(dy_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        normed = s * rstd
        dw += dy * normed.to(s_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded row
        dn = dy * w
        dx = (dn - normed * (tl.sum(dn * normed, axis=1)[:, None] / columns)) * rstd
        if HAS_DS:
            dx += tl.load(ds_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offset, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + program * columns + tl.arange(0, BLOCK), tl.sum(dw, axis=0), mask=tl.arange(0, BLOCK) < columns)


def add_rms_norm_forward(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight * norm(x + a), x + a, 1 / rms per row) for contiguous x and a of one shape [..., columns]; the sum
    in torch's promoted dtype of x and a, the output in that of the weight and the sum."""
    columns = x.shape[-1]
    rows = x.numel() // columns
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, a.dtype), device=x.device)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, s.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows_per_block, block, warps = _block(columns)
    _forward_kernel[(triton.cdiv(rows, rows_per_block),)](x, a, weight, y, s, rstd, rows, columns, eps,
                                                          ROWS=rows_per_block, BLOCK=block, num_warps=warps)
    return y, s, rstd


def add_rms_norm_backward(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gradient of x + a, the weight's gradient) from the output's gradient `dy` and the sum's `ds` (None:
    the sum had no other use); the first in the sum's dtype, the second in the weight's."""
    columns = s.shape[-1]
    rows = s.numel() // columns
    dx = torch.empty_like(s)
    rows_per_block, block, warps = _block(columns)
    programs = max(1, min(triton.cdiv(rows, rows_per_block), PROGRAMS_PER_SM * sm_count(s.device)))
    partial = torch.empty((programs, columns), dtype=torch.float32, device=s.device)
    _backward_kernel[(programs,)](dy, dy if ds is None else ds, s, rstd, weight, dx, partial, rows, columns,
                                  HAS_DS=ds is not None, ROWS=rows_per_block, BLOCK=block, num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)
