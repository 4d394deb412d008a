"""The row kernels of our short conv (HD_CONV_KERNELS=rows, the default, sessions 22-23): each thread walks its
channels down the tokens with the last inputs in registers; the backward is one pass. short_conv_triton.py launches
them."""
from __future__ import annotations

import triton
import triton.language as tl

from .short_conv_common import ROWS_PER_PROGRAM, _sigmoid, _tap

# (channels, warps, groups of 4 rows read ahead): the row backward, ROWS_PER_PROGRAM rows per program (its partial
# sums' rows); reading 2 groups ahead keeps more in flight for more registers (1 was session 22's walk)
_ROW_TILES = [(channels, warps, ahead) for channels, warps in ((64, 1), (64, 2), (128, 1), (128, 2), (128, 4),
                                                              (256, 2), (256, 4)) for ahead in (1, 2)]
# (channels, warps, groups ahead, rows per program): the row forward, which sums nothing across rows, so its programs
# may be short
_FORWARD_ROW_TILES = [(channels, warps, ahead, rows) for channels, warps in ((64, 1), (128, 1), (128, 2), (256, 2))
                      for ahead in (1, 2) for rows in (32, ROWS_PER_PROGRAM)]


def _row_configs(tiles):
    """(channels, warps, groups ahead[, rows per program]) -> configs."""
    return [triton.Config({"BLOCK_D": tile[0], "AHEAD": tile[2]} | ({"ROWS": tile[3]} if len(tile) > 3 else {}),
                          num_warps=tile[1]) for tile in tiles]


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
def _taps_and_bias(w_ptr, b_ptr, cols, col_mask, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The 4 taps of the channels `cols` and their bias (zeros without one), float32."""
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return (_tap(w_ptr, cols, col_mask, 0, 4), _tap(w_ptr, cols, col_mask, 1, 4), _tap(w_ptr, cols, col_mask, 2, 4),
            _tap(w_ptr, cols, col_mask, 3, 4), bias)


@triton.jit
def _rows_before(base, start, stride_t, cols, col_mask, T):
    """Rows start-3..start-1: the inputs before a program's first row (zeros before the sequence)."""
    return (_row(base, start - 3, stride_t, cols, col_mask, T), _row(base, start - 2, stride_t, cols, col_mask, T),
            _row(base, start - 1, stride_t, cols, col_mask, T))


@triton.jit
def _pre(bias, w0, w1, w2, w3, x0, x1, x2, x3):
    """bias + the 4 taps on the 4 inputs ending at the current row."""
    return bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3


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
    w0, w1, w2, w3, bias = _taps_and_bias(w_ptr, b_ptr, cols, col_mask, HAS_BIAS, BLOCK_D)
    start = pid_t * ROWS
    end = tl.minimum(start + ROWS, T)
    xm3, xm2, xm1 = _rows_before(x_base, start, stride_xt, cols, col_mask, T)
    xa, xb, xc, xd = _rows4(x_base, start, stride_xt, cols, col_mask, end)  # nothing past this program's rows
    if AHEAD == 2:
        na, nb, nc, nd = _rows4(x_base, start + 4, stride_xt, cols, col_mask, end)
    for base in range(start, end, 4):
        if AHEAD == 2:
            fa, fb, fc, fd = _rows4(x_base, base + 8, stride_xt, cols, col_mask, end)
        else:
            na, nb, nc, nd = _rows4(x_base, base + 4, stride_xt, cols, col_mask, end)
        pa = _pre(bias, w0, w1, w2, w3, xm3, xm2, xm1, xa)
        pb = _pre(bias, w0, w1, w2, w3, xm2, xm1, xa, xb)
        pc = _pre(bias, w0, w1, w2, w3, xm1, xa, xb, xc)
        pd = _pre(bias, w0, w1, w2, w3, xa, xb, xc, xd)
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
    w0, w1, w2, w3, bias = _taps_and_bias(w_ptr, b_ptr, cols, col_mask, HAS_BIAS, BLOCK_D)
    start = pid_t * ROWS
    end = tl.minimum(start + ROWS, T)
    xm3, xm2, xm1 = _rows_before(x_base, start, stride_xt, cols, col_mask, T)
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
        ga = _silu_grad(_pre(bias, w0, w1, w2, w3, xm3, xm2, xm1, xa), da, FAST)
        gb = _silu_grad(_pre(bias, w0, w1, w2, w3, xm2, xm1, xa, xb), db, FAST)
        gc = _silu_grad(_pre(bias, w0, w1, w2, w3, xm1, xa, xb, xc), dc, FAST)
        gd = _silu_grad(_pre(bias, w0, w1, w2, w3, xa, xb, xc, xd), dd, FAST)
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
    ga = _silu_grad(_pre(bias, w0, w1, w2, w3, xm3, xm2, xm1, xa), da, FAST)
    gb = _silu_grad(_pre(bias, w0, w1, w2, w3, xm2, xm1, xa, xb), db, FAST)
    gc = _silu_grad(_pre(bias, w0, w1, w2, w3, xm1, xa, xb, xc), dc, FAST)
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
