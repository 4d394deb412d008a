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

from .kernels import KERNEL_CONV_MAX_TAPS as TAPS, column_blocks, op_choice  # the backward is written for 4 taps
from .short_conv_common import ROWS_PER_PROGRAM
# the kernels and their autotune candidates, also read here by the GPU tests and scripts/gpu/kernel_registers.py
from .short_conv_rows import (_FORWARD_ROW_TILES, _ROW_TILES, _conv_silu_backward_rows, _conv_silu_forward_rows,
                              _row_configs)
from .short_conv_tiles import (_FIRST_PASS_TILES, _TILES, BLOCK_T, _configs, _conv_silu_forward, _conv_silu_grad_input,
                               _conv_silu_grad_pre)

BLOCK_D = 128  # the default tiles' channels (CPU)
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
