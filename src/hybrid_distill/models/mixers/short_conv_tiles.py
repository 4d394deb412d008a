"""The tiled kernels of our short conv (HD_CONV_KERNELS=tiles, sessions 19-21): a forward that loads 4 shifted
tiles, and a two-pass backward (g = dy * silu'(pre) stored in x's dtype with the taps' partial sums, then dx from 4
shifted tiles of g). short_conv_triton.py launches them."""
from __future__ import annotations

import triton
import triton.language as tl

from .short_conv_common import _sigmoid, _tap

BLOCK_T = 32  # the default tile (CPU, and the first autotune candidate): tokens x channels per program
_TILES = [(32, 128, 4), (64, 64, 4), (64, 128, 8)]  # (tokens, channels, warps): the autotune candidates
_FIRST_PASS_TILES = [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 8)]


def _configs(tiles):
    return [triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w) for t, d, w in tiles]


@triton.jit
def _shifted(base, rows, shift, cols, T, stride_t, col_mask):
    """The float32 tile of rows + shift (zeros outside [0, T)) and the given columns."""
    source = rows + shift
    mask = (source >= 0) & (source < T)
    return tl.load(base + source[:, None] * stride_t + cols[None, :], mask=mask[:, None] & col_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_base, rows, cols, col_mask, stride_t, w_ptr, b_ptr, T, HAS_BIAS: tl.constexpr,
                    WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        acc += _shifted(x_base, rows, j - (WIDTH - 1), cols, T, stride_t, col_mask) * \
            _tap(w_ptr, cols, col_mask, j, WIDTH)[None, :]
    return acc


@triton.jit
def _conv_silu_forward(x_ptr, w_ptr, b_ptr, y_ptr, T, D, stride_xb, stride_xt, stride_yb, stride_yt,
                       HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, FAST: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    pre = _pre_activation(x_ptr + pid_b * stride_xb, rows, cols, col_mask, stride_xt, w_ptr, b_ptr, T, HAS_BIAS,
                          WIDTH, BLOCK_T, BLOCK_D)
    tl.store(y_ptr + pid_b * stride_yb + rows[:, None] * stride_yt + cols[None, :],
             (pre * _sigmoid(pre, FAST)).to(y_ptr.dtype.element_ty), mask=(rows < T)[:, None] & col_mask[None, :])


@triton.jit
def _conv_silu_grad_pre(x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr, T, D, stride_xb, stride_xt,
                        stride_dyb, stride_dyt, stride_dw, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                        FAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """First backward pass over ROWS tokens of a 4-tap conv: g = dy * silu'(pre) into the contiguous g, and this
    program's row of the partial sums dw[j] = sum_t x[t-3+j] g[t] and db = sum_t g[t] (float32, from g before
    rounding; dw's rows stride_dw elements apart, so that several convs can share one buffer). The four shifted x
    tiles are loaded once per tile and kept for both uses; the sums stay whole tiles until the end (one reduction
    each per program, none per tile)."""
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    x_base = x_ptr + pid_b * stride_xb
    w0 = _tap(w_ptr, cols, col_mask, 0, 4)[None, :]
    w1 = _tap(w_ptr, cols, col_mask, 1, 4)[None, :]
    w2 = _tap(w_ptr, cols, col_mask, 2, 4)[None, :]
    w3 = _tap(w_ptr, cols, col_mask, 3, 4)[None, :]
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw0 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for step in tl.static_range(ROWS // BLOCK_T):
        rows = pid_t * ROWS + step * BLOCK_T + tl.arange(0, BLOCK_T)
        x0 = _shifted(x_base, rows, -3, cols, T, stride_xt, col_mask)
        x1 = _shifted(x_base, rows, -2, cols, T, stride_xt, col_mask)
        x2 = _shifted(x_base, rows, -1, cols, T, stride_xt, col_mask)
        x3 = _shifted(x_base, rows, 0, cols, T, stride_xt, col_mask)
        pre = bias[None, :] + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
        gate = _sigmoid(pre, FAST)
        g = _shifted(dy_ptr + pid_b * stride_dyb, rows, 0, cols, T, stride_dyt, col_mask) * \
            gate * (1.0 + pre * (1.0 - gate))  # zero past T, where dy loads as zero
        tl.store(g_ptr + (pid_b * T + rows[:, None]) * D + cols[None, :], g.to(g_ptr.dtype.element_ty),
                 mask=(rows < T)[:, None] & col_mask[None, :])
        dw0 += x0 * g
        dw1 += x1 * g
        dw2 += x2 * g
        dw3 += x3 * g
        db += g
    program = pid_b * tl.num_programs(0) + pid_t
    partial = dw_ptr + program * stride_dw + cols * 4
    tl.store(partial, tl.sum(dw0, axis=0), mask=col_mask)
    tl.store(partial + 1, tl.sum(dw1, axis=0), mask=col_mask)
    tl.store(partial + 2, tl.sum(dw2, axis=0), mask=col_mask)
    tl.store(partial + 3, tl.sum(dw3, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(db_ptr + program * D + cols, tl.sum(db, axis=0), mask=col_mask)


@triton.jit
def _conv_silu_grad_input(g_ptr, w_ptr, dx_ptr, T, D, stride_dxb, stride_dxt,
                          WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Second backward pass: dx[t] = sum_k w[W-1-k] g[t+k] (g zero past T)."""
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        dx += _shifted(g_ptr + pid_b * T * D, rows, k, cols, T, D, col_mask) * \
            _tap(w_ptr, cols, col_mask, WIDTH - 1 - k, WIDTH)[None, :]
    tl.store(dx_ptr + pid_b * stride_dxb + rows[:, None] * stride_dxt + cols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=(rows < T)[:, None] & col_mask[None, :])
