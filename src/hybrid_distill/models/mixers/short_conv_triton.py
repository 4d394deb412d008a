"""silu(causal depthwise conv) over a sequence in Triton kernels of our own (HD_SHORT_CONV=triton).

Why not fla's: in a graphed all-GDN step at SmolLM2 shapes on an H200, fla's conv backward took 125 us per call (90
calls, 11.3 ms of a 147 ms step), about 4x what reading x and dy and writing dx costs, and it runs the forward again
first (session 18, docs/performance.md). Two kernel sets (HD_CONV_KERNELS):
- rows (the default, session 22): each thread walks its channels down ROWS tokens, keeping the last 3 inputs (and
  in backward the last 3 g = dy * silu'(pre)) in registers, so x and dy are read once. The backward is one pass:
  dx[t-3] is written as soon as g[t] is known, the next program's first 3 rows' g are recomputed (not summed), and
  the taps' and bias's gradients are summed per thread into the program's partial-sum row (deterministic: no
  atomics, no cross-thread reduction, no g buffer). Reads run 1 or 2 groups of 4 rows ahead (autotuned): a walk
  waits on memory once per group. Session 22, graphed all-GDN step at 64 x 512 on an H200: the backward 4.1-4.25 ms
  per step against the tiles' 10.8 ms; the step 134.9-135.1 ms against 141.1 (+4.5%);
- tiles (sessions 19-21): the forward loads 4 shifted tiles; the backward is two passes, g stored in x's dtype with
  the partial sums from whole-tile accumulators, then dx[t] = sum_k w[W-1-k] g[t+k] from 4 shifted tiles of g.
The row kernels and the tiled backward are written for 4 taps (the default conv_size): a narrower conv runs with
leading zero taps. The kernels take x with any batch and token strides (the columns of the mixer's input GEMM pass
without a copy). On CUDA the tiles are autotuned per (length, channels); on CPU the kernels run only under
TRITON_INTERPRET=1 (the tests), with the default tiles.

The function is the one torch_ops and ShortConvolution compute: y[t] = silu(bias + sum_j w[j] * x[t - (W-1) + j])
from zero history, taps summed in float32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .kernels import KERNEL_CONV_MAX_TAPS as TAPS, column_blocks, op_choice  # the backward is written for 4 taps

BLOCK_T = 32  # the default tile (CPU, and the first autotune candidate): tokens x channels per program
BLOCK_D = 128
ROWS_PER_PROGRAM = 128  # tokens one first-pass program sums the taps' gradients over: one partial-sum row each
_TILES = [(32, 128, 4), (64, 64, 4), (64, 128, 8)]  # (tokens, channels, warps): the autotune candidates
_FIRST_PASS_TILES = [(16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 8)]
# (channels, warps, groups of 4 rows read ahead): the row backward, ROWS_PER_PROGRAM rows per program (its partial
# sums' rows); reading 2 groups ahead keeps more in flight for more registers (1 was session 22's walk)
_ROW_TILES = [(channels, warps, ahead) for channels, warps in ((64, 1), (64, 2), (128, 1), (128, 2), (128, 4),
                                                              (256, 2), (256, 4)) for ahead in (1, 2)]
# (channels, warps, groups ahead, rows per program): the row forward, which sums nothing across rows, so its programs
# may be short
_FORWARD_ROW_TILES = [(channels, warps, ahead, rows) for channels, warps in ((64, 1), (128, 1), (128, 2), (256, 2))
                      for ahead in (1, 2) for rows in (32, ROWS_PER_PROGRAM)]

def _configs(tiles):
    return [triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w) for t, d, w in tiles]


def _row_configs(tiles):
    """(channels, warps, groups ahead[, rows per program]) -> configs."""
    return [triton.Config({"BLOCK_D": tile[0], "AHEAD": tile[2]} | ({"ROWS": tile[3]} if len(tile) > 3 else {}),
                          num_warps=tile[1]) for tile in tiles]


@triton.jit
def _shifted(base, rows, shift, cols, T, stride_t, col_mask):
    """The float32 tile of rows + shift (zeros outside [0, T)) and the given columns."""
    source = rows + shift
    mask = (source >= 0) & (source < T)
    return tl.load(base + source[:, None] * stride_t + cols[None, :], mask=mask[:, None] & col_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _tap(w_ptr, cols, col_mask, j, WIDTH: tl.constexpr):
    return tl.load(w_ptr + cols * WIDTH + j, mask=col_mask, other=0.0).to(tl.float32)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """1 / (1 + 2^(-x log2(e))) in float32. FAST (CUDA): PTX's approximate exp2 and reciprocal that flush
    denormals, so a sigmoid below about 1e-38 is 0. They drop the IEEE versions' range checks: our forward runs 24%
    fewer instructions and the first backward pass 17% (SASS for sm_90, session 21). Otherwise tl.sigmoid (the
    interpreter runs no PTX)."""
    if FAST:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
            "=r,r", [x * -1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


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


@triton.jit
def _in_rows(col_mask, t, low, high):
    """col_mask where low <= t < high, else all false (a vector: the interpreter takes no scalar masks)."""
    rows = tl.full(col_mask.shape, t, tl.int32)
    return col_mask & (rows >= low) & (rows < high)


@triton.jit
def _row(base, t, stride_t, cols, col_mask, T):
    """Row t of a [T, D] view, float32, zeros outside [0, T)."""
    return tl.load(base + t * stride_t + cols, mask=_in_rows(col_mask, t, 0, T), other=0.0).to(tl.float32)


@triton.jit
def _rows4(base, t, stride_t, cols, col_mask, T):
    """Rows t..t+3, loaded together so that their reads are in flight at once."""
    return (_row(base, t, stride_t, cols, col_mask, T), _row(base, t + 1, stride_t, cols, col_mask, T),
            _row(base, t + 2, stride_t, cols, col_mask, T), _row(base, t + 3, stride_t, cols, col_mask, T))


@triton.jit
def _store_row(base, t, stride_t, cols, col_mask, value, low, T):
    tl.store(base + t * stride_t + cols, value.to(base.dtype.element_ty), mask=_in_rows(col_mask, t, low, T))


@triton.jit
def _silu_grad(pre, dy, FAST: tl.constexpr):
    """dy * silu'(pre)."""
    gate = _sigmoid(pre, FAST)
    return dy * gate * (1.0 + pre * (1.0 - gate))


@triton.jit
def _conv_silu_forward_rows(x_ptr, w_ptr, b_ptr, y_ptr, T, D, stride_xb, stride_xt, stride_yb, stride_yt,
                            HAS_BIAS: tl.constexpr, FAST: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                            AHEAD: tl.constexpr):
    """The forward of a 4-tap conv, row after row over ROWS tokens of BLOCK_D channels: each thread keeps its
    channels' last 3 inputs in registers, so every input is read once (the tiled forward loads 4 shifted tiles),
    and the rows AHEAD (1 or 2) groups of 4 ahead are read while the current 4 are computed (a walk of rows waits
    on memory once per group, so reads further ahead keep more in flight)."""
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    x_base, y_base = x_ptr + pid_b * stride_xb, y_ptr + pid_b * stride_yb
    w0, w1 = _tap(w_ptr, cols, col_mask, 0, 4), _tap(w_ptr, cols, col_mask, 1, 4)
    w2, w3 = _tap(w_ptr, cols, col_mask, 2, 4), _tap(w_ptr, cols, col_mask, 3, 4)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    start = pid_t * ROWS
    end = tl.minimum(start + ROWS, T)
    xm3, xm2, xm1 = (_row(x_base, start - 3, stride_xt, cols, col_mask, T),
                     _row(x_base, start - 2, stride_xt, cols, col_mask, T),
                     _row(x_base, start - 1, stride_xt, cols, col_mask, T))
    xa, xb, xc, xd = _rows4(x_base, start, stride_xt, cols, col_mask, end)  # nothing past this program's rows
    if AHEAD == 2:
        na, nb, nc, nd = _rows4(x_base, start + 4, stride_xt, cols, col_mask, end)
    for base in range(start, end, 4):
        if AHEAD == 2:
            fa, fb, fc, fd = _rows4(x_base, base + 8, stride_xt, cols, col_mask, end)
        else:
            na, nb, nc, nd = _rows4(x_base, base + 4, stride_xt, cols, col_mask, end)
        pa = bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * xa
        pb = bias + w0 * xm2 + w1 * xm1 + w2 * xa + w3 * xb
        pc = bias + w0 * xm1 + w1 * xa + w2 * xb + w3 * xc
        pd = bias + w0 * xa + w1 * xb + w2 * xc + w3 * xd
        _store_row(y_base, base, stride_yt, cols, col_mask, pa * _sigmoid(pa, FAST), start, end)
        _store_row(y_base, base + 1, stride_yt, cols, col_mask, pb * _sigmoid(pb, FAST), start, end)
        _store_row(y_base, base + 2, stride_yt, cols, col_mask, pc * _sigmoid(pc, FAST), start, end)
        _store_row(y_base, base + 3, stride_yt, cols, col_mask, pd * _sigmoid(pd, FAST), start, end)
        xm3, xm2, xm1 = xb, xc, xd
        xa, xb, xc, xd = na, nb, nc, nd
        if AHEAD == 2:
            na, nb, nc, nd = fa, fb, fc, fd


@triton.jit
def _conv_silu_backward_rows(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, T, D, stride_xb, stride_xt,
                             stride_dyb, stride_dyt, stride_dxb, stride_dxt, stride_dw, HAS_BIAS: tl.constexpr,
                             FAST: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr):
    """The whole backward of a 4-tap conv in one pass, row after row over ROWS tokens of BLOCK_D channels:
    g[t] = dy[t] silu'(pre[t]) from the last 4 inputs kept in registers; dx[t-3] = sum_j w[j] g[t-j] as soon as
    g[t] is known (the last 3 rows' g of the next program's rows recomputed here, not summed); this program's row
    of the partial sums dw[j] = sum_t x[t-3+j] g[t] and db = sum_t g[t], per thread, so no reduction crosses
    threads. Reads x and dy once (AHEAD groups of 4 rows ahead, as the forward), writes dx: no g buffer and no
    second pass."""
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    x_base, dy_base, dx_base = x_ptr + pid_b * stride_xb, dy_ptr + pid_b * stride_dyb, dx_ptr + pid_b * stride_dxb
    w0, w1 = _tap(w_ptr, cols, col_mask, 0, 4), _tap(w_ptr, cols, col_mask, 1, 4)
    w2, w3 = _tap(w_ptr, cols, col_mask, 2, 4), _tap(w_ptr, cols, col_mask, 3, 4)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    start = pid_t * ROWS
    end = tl.minimum(start + ROWS, T)
    xm3, xm2, xm1 = (_row(x_base, start - 3, stride_xt, cols, col_mask, T),
                     _row(x_base, start - 2, stride_xt, cols, col_mask, T),
                     _row(x_base, start - 1, stride_xt, cols, col_mask, T))
    gm3 = tl.zeros((BLOCK_D,), dtype=tl.float32)  # g before this program's rows: only for dx rows it skips
    gm2, gm1 = gm3, gm3
    dw0, dw1, dw2, dw3, dbias = gm3, gm3, gm3, gm3, gm3
    stop = tl.minimum(end + 3, T)  # the rows read: this program's and the next one's first 3
    xa, xb, xc, xd = _rows4(x_base, start, stride_xt, cols, col_mask, stop)
    da, db, dc, dd = _rows4(dy_base, start, stride_dyt, cols, col_mask, stop)  # zero past T, so is g there
    if AHEAD == 2:
        na, nb, nc, nd = _rows4(x_base, start + 4, stride_xt, cols, col_mask, stop)
        ea, eb, ec, ed = _rows4(dy_base, start + 4, stride_dyt, cols, col_mask, stop)
    for base in range(start, end, 4):
        if AHEAD == 2:
            fa, fb, fc, fd = _rows4(x_base, base + 8, stride_xt, cols, col_mask, stop)
            ha, hb, hc, hd = _rows4(dy_base, base + 8, stride_dyt, cols, col_mask, stop)
        else:
            na, nb, nc, nd = _rows4(x_base, base + 4, stride_xt, cols, col_mask, stop)
            ea, eb, ec, ed = _rows4(dy_base, base + 4, stride_dyt, cols, col_mask, stop)
        ga = _silu_grad(bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * xa, da, FAST)
        gb = _silu_grad(bias + w0 * xm2 + w1 * xm1 + w2 * xa + w3 * xb, db, FAST)
        gc = _silu_grad(bias + w0 * xm1 + w1 * xa + w2 * xb + w3 * xc, dc, FAST)
        gd = _silu_grad(bias + w0 * xa + w1 * xb + w2 * xc + w3 * xd, dd, FAST)
        dw0 += xm3 * ga + xm2 * gb + xm1 * gc + xa * gd
        dw1 += xm2 * ga + xm1 * gb + xa * gc + xb * gd
        dw2 += xm1 * ga + xa * gb + xb * gc + xc * gd
        dw3 += xa * ga + xb * gb + xc * gc + xd * gd
        dbias += ga + gb + gc + gd
        _store_row(dx_base, base - 3, stride_dxt, cols, col_mask, w3 * gm3 + w2 * gm2 + w1 * gm1 + w0 * ga, start, T)
        _store_row(dx_base, base - 2, stride_dxt, cols, col_mask, w3 * gm2 + w2 * gm1 + w1 * ga + w0 * gb, start, T)
        _store_row(dx_base, base - 1, stride_dxt, cols, col_mask, w3 * gm1 + w2 * ga + w1 * gb + w0 * gc, start, T)
        _store_row(dx_base, base, stride_dxt, cols, col_mask, w3 * ga + w2 * gb + w1 * gc + w0 * gd, start, T)
        xm3, xm2, xm1, gm3, gm2, gm1 = xb, xc, xd, gb, gc, gd
        xa, xb, xc, xd, da, db, dc, dd = na, nb, nc, nd, ea, eb, ec, ed
        if AHEAD == 2:
            na, nb, nc, nd, ea, eb, ec, ed = fa, fb, fc, fd, ha, hb, hc, hd
    # the last 3 rows' dx need g of the 3 rows after them (the next program's; zero past T): recomputed, not summed
    last = start + tl.cdiv(end - start, 4) * 4  # the first row after the loop's
    ga = _silu_grad(bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * xa, da, FAST)
    gb = _silu_grad(bias + w0 * xm2 + w1 * xm1 + w2 * xa + w3 * xb, db, FAST)
    gc = _silu_grad(bias + w0 * xm1 + w1 * xa + w2 * xb + w3 * xc, dc, FAST)
    _store_row(dx_base, last - 3, stride_dxt, cols, col_mask, w3 * gm3 + w2 * gm2 + w1 * gm1 + w0 * ga, start, T)
    _store_row(dx_base, last - 2, stride_dxt, cols, col_mask, w3 * gm2 + w2 * gm1 + w1 * ga + w0 * gb, start, T)
    _store_row(dx_base, last - 1, stride_dxt, cols, col_mask, w3 * gm1 + w2 * ga + w1 * gb + w0 * gc, start, T)
    program = pid_b * tl.num_programs(0) + pid_t
    partial = dw_ptr + program * stride_dw + cols * 4
    tl.store(partial, dw0, mask=col_mask)
    tl.store(partial + 1, dw1, mask=col_mask)
    tl.store(partial + 2, dw2, mask=col_mask)
    tl.store(partial + 3, dw3, mask=col_mask)
    if HAS_BIAS:
        tl.store(db_ptr + program * D + cols, dbias, mask=col_mask)


_TUNED = {
    "forward": triton.autotune(_configs(_TILES), key=["T", "D", "HAS_BIAS"])(_conv_silu_forward),
    "grad_pre": triton.autotune(_configs(_FIRST_PASS_TILES), key=["T", "D", "HAS_BIAS"])(_conv_silu_grad_pre),
    "grad_input": triton.autotune(_configs(_TILES), key=["T", "D"])(_conv_silu_grad_input),
    "forward_rows": triton.autotune(_row_configs(_FORWARD_ROW_TILES), key=["T", "D", "HAS_BIAS"])(
        _conv_silu_forward_rows),
    "backward_rows": triton.autotune(_row_configs(_ROW_TILES), key=["T", "D", "HAS_BIAS"])(_conv_silu_backward_rows),
}
_PLAIN = {"forward": _conv_silu_forward, "grad_pre": _conv_silu_grad_pre, "grad_input": _conv_silu_grad_input,
          "forward_rows": _conv_silu_forward_rows, "backward_rows": _conv_silu_backward_rows}
_PLAIN_TILES = {name: {"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D} for name in ("forward", "grad_pre", "grad_input")} | \
    {"forward_rows": {"BLOCK_D": BLOCK_D, "AHEAD": 2, "ROWS": ROWS_PER_PROGRAM},
     "backward_rows": {"BLOCK_D": BLOCK_D, "AHEAD": 2}}


def _launch(name: str, x: torch.Tensor, grid_rows, *args, **constants) -> None:
    """Runs kernel `name` over x's [B, T, D]: autotuned tiles on CUDA, the default tiles elsewhere (the
    interpreter); grid_rows(tile's meta-parameters) is the grid's first dimension."""
    batch, _, channels = x.shape
    if x.is_cuda:
        _TUNED[name][lambda meta: (grid_rows(meta), triton.cdiv(channels, meta["BLOCK_D"]), batch)](*args, **constants)
    else:
        tiles = _PLAIN_TILES[name]
        _PLAIN[name][(grid_rows(tiles), triton.cdiv(channels, tiles["BLOCK_D"]), batch)](*args, **constants, **tiles)


def _row_kernels() -> bool:
    """Whether the row kernels run (HD_CONV_KERNELS=rows) rather than the tiled ones."""
    return op_choice("HD_CONV_KERNELS") == "rows"


def _four_taps(weight: torch.Tensor) -> torch.Tensor:
    """weight [D, taps] as 4 taps: leading zero taps for a narrower conv."""
    return weight if weight.shape[1] == TAPS else F.pad(weight, (TAPS - weight.shape[1], 0))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not 1 <= weight.shape[1] <= TAPS:
        raise ValueError(f"our Triton short conv takes 1 to {TAPS} taps, not {weight.shape[1]}")
    length, channels = x.shape[1:]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    if _row_kernels():
        taps = _four_taps(weight)
        _launch("forward_rows", x, lambda meta: triton.cdiv(length, meta["ROWS"]), x, taps,
                bias if bias is not None else taps, y, length, channels, *strides, HAS_BIAS=bias is not None,
                FAST=x.is_cuda)
    else:
        _launch("forward", x, lambda meta: triton.cdiv(length, meta["BLOCK_T"]), x, weight,
                bias if bias is not None else weight, y, length, channels, *strides, HAS_BIAS=bias is not None,
                WIDTH=weight.shape[1], FAST=x.is_cuda)
    return y


def _partial_sums(x: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """The float32 buffer of the first backward pass's partial sums over x's [B, T, D]: one row per program, 4 taps
    per channel, over `columns` channels (default D; more when several convs share the buffer)."""
    batch, length, channels = x.shape
    programs = batch * triton.cdiv(length, ROWS_PER_PROGRAM)
    return torch.empty(programs, (columns or channels) * TAPS, dtype=torch.float32, device=x.device)


def _backward_partials(dx: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                       dw: torch.Tensor, db: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """Both backward passes of one conv (contiguous weight [D, taps]): writes the input's gradient into dx
    (channels with stride 1, any batch and token strides) and the taps' (and bias's) partial sums into the rows of
    dw (and db)."""
    dy = _channels_last(dy)
    length, channels = x.shape[1:]
    taps = _four_taps(weight)
    programs = lambda meta: triton.cdiv(length, ROWS_PER_PROGRAM)  # noqa: E731  one partial-sum row each
    if _row_kernels():
        _launch("backward_rows", x, programs, x, taps, bias if bias is not None else taps, dy, dx, dw,
                db if db is not None else dw, length, channels, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                dx.stride(0), dx.stride(1), dw.stride(0), HAS_BIAS=bias is not None, FAST=x.is_cuda,
                ROWS=ROWS_PER_PROGRAM)
        return
    g = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch("grad_pre", x, programs, x, taps, bias if bias is not None else taps, dy, g, dw,
            db if db is not None else dw, length, channels, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), HAS_BIAS=bias is not None, ROWS=ROWS_PER_PROGRAM, FAST=x.is_cuda)
    _launch("grad_input", x, lambda meta: triton.cdiv(length, meta["BLOCK_T"]), g, weight, dx, length, channels,
            dx.stride(0), dx.stride(1), WIDTH=weight.shape[1])


def _taps_grad(dw: torch.Tensor, width: int) -> torch.Tensor:
    """[columns, width] float32: the taps' gradients summed from the partial-sum rows of dw (4 taps per column)."""
    return dw.sum(0).view(-1, TAPS)[:, TAPS - width:]


def _backward_into(dx: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dy: torch.Tensor):
    """Writes the input's gradient into dx (channels with stride 1, any batch and token strides); returns the taps'
    and the bias's gradients."""
    dw = _partial_sums(x)
    db = torch.empty(dw.shape[0], x.shape[-1], dtype=torch.float32, device=x.device) if bias is not None else None
    _backward_partials(dx, x, weight, dy, dw, db, bias)
    bias_grad = db.sum(0).to(bias.dtype) if bias is not None else None
    return _taps_grad(dw, weight.shape[1]).to(weight.dtype), bias_grad


class _ShortConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x, weight = _channels_last(x), weight.contiguous()
        ctx.save_for_backward(x, weight, bias)
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return dx, *_backward_into(dx, x, weight, bias, dy)


class _ProjectedConvs(torch.autograd.Function):
    """The q, k and v convs of a mixer read in place from its fused input GEMM's output; the gates' projections,
    the next listed column blocks, pass through as copies. Backward writes every column's gradient into one buffer
    of the GEMM output's shape (zeros past the listed blocks: the padding), so nothing concatenates the
    per-projection gradients (a `split`'s backward: 99 us per layer in a graphed all-GDN step on an H200, session
    20). The three convs' partial tap sums share one buffer, so one reduction and one cast serve them all."""

    @staticmethod
    def forward(ctx, projected, widths, *weights):
        weights = [weight.contiguous() for weight in weights]
        blocks = column_blocks(projected, widths)
        convolved = [_forward(x, weight, None) for x, weight in zip(blocks, weights)]
        passed = [x.clone() for x in blocks[len(weights):]]
        ctx.save_for_backward(projected, *weights)
        ctx.widths = widths
        return (*convolved, *passed)

    @staticmethod
    def backward(ctx, *grads):
        projected, *weights = ctx.saved_tensors
        d_projected = torch.empty_like(projected)
        d_projected[..., sum(ctx.widths):].zero_()
        d_blocks = column_blocks(d_projected, ctx.widths)
        x_blocks = column_blocks(projected, ctx.widths)
        conv_widths = ctx.widths[:len(weights)]
        dw = _partial_sums(projected, sum(conv_widths))  # the three convs' partial sums: one reduction, one cast
        for d_x, x, weight, grad, dw_block in zip(d_blocks, x_blocks, weights, grads,
                                                  column_blocks(dw, [width * TAPS for width in conv_widths])):
            _backward_partials(d_x, x, weight, grad, dw_block)
        for d_block, grad in zip(d_blocks[len(weights):], grads[len(weights):]):
            d_block.copy_(grad)  # autograd gives zeros for an output nobody used
        summed = _taps_grad(dw, TAPS).to(weights[0].dtype)
        weight_grads = [block[:, TAPS - weight.shape[1]:].to(weight.dtype)
                        for block, weight in zip(summed.split(conv_widths), weights)]
        return d_projected, None, *weight_grads


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv(x)) over [B, T, D] (channels with stride 1, any batch and token strides) from zero
    history; weight [D, taps], the last tap on the current token. Returns a contiguous [B, T, D] in x's dtype."""
    return _ShortConvSilu.apply(x, weight, bias)


def projected_convs(projected: torch.Tensor, widths: list[int], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[silu(conv(column block)) for the first len(weights) column blocks of `projected` [B, T, columns], then
    copies of the other blocks that `widths` lists]: convs without bias, from zero history; one gradient buffer for
    all, zero in the columns past sum(widths) (see _ProjectedConvs)."""
    return list(_ProjectedConvs.apply(projected, tuple(widths), *weights))
