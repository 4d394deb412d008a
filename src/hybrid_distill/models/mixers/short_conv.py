"""Causal depthwise convolution with a decoding cache, state_dict-compatible with fla's ShortConvolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv + SiLU over [B, T, D]; keeps the last `kernel_size - 1` inputs as its cache."""

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         padding=kernel_size - 1)

    def reset_to_identity(self) -> None:
        """Pass-through init: only the tap on the current token is 1, so the conv starts as x -> silu(x)."""
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0, -1] = 1.0
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """Returns (silu(conv(x)), new cache [B, D, kernel_size-1])."""
        length = x.shape[1]
        if cache is None and length > 1 and self.kernel_size[0] <= kernels.KERNEL_CONV_MAX_TAPS \
                and kernels.use_kernel_short_conv(x):
            return kernels.short_conv_silu(x, self.weight[:, 0], self.bias), self._last_inputs(x)
        if torch.compiler.is_compiling() and length > 1:
            return self._shifted_sums(x, cache)
        inputs = x.transpose(1, 2)
        history = self.kernel_size[0] - 1
        if cache is None:
            cache = inputs.new_zeros(inputs.shape[0], inputs.shape[1], history)
        padded = torch.cat([cache.to(inputs.dtype), inputs], dim=-1)
        if length == 1:  # a decode step: one weighted sum over the window, which the compiler fuses with the rest
            out = (padded * self.weight[:, 0]).sum(-1, keepdim=True)
            out = out if self.bias is None else out + self.bias[:, None]
        else:
            out = F.conv1d(padded, self.weight, self.bias, groups=self.groups)
        # a copy: a view would keep the whole padded input (a prefill's length) alive inside the decoding cache
        new_cache = (padded[..., -history:] if history else padded[..., :0]).contiguous()
        return F.silu(out[..., -length:]).transpose(1, 2), new_cache

    def _last_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The decoding cache after a sequence read from zero history: its last kernel_size - 1 inputs, [B, D, k-1]."""
        history = self.kernel_size[0] - 1
        last = x[:, max(x.shape[1] - history, 0):]  # sliced before padding: the pad copies what it is given
        return F.pad(last, (0, 0, history - last.shape[1], 0)).transpose(1, 2).contiguous()

    def _shifted_sums(self, x: torch.Tensor, cache: torch.Tensor | None):
        """The same conv as kernel_size shifted multiply-adds over [B, T, D], for compiled code: Inductor fuses
        them with the SiLU (and their backward with the weight's gradient sums) in the tokens' own layout, where
        ATen's depthwise conv needs [B, D, T] copies each way and its generic kernels took 15% of a compiled
        all-GDN stage-2 step on an H200 (docs/performance.md). Sums in float32, rounded once, as the conv's
        accumulator does."""
        history = self.kernel_size[0] - 1
        batch, length, channels = x.shape
        if cache is None:
            cache = x.new_zeros(batch, channels, history)
        padded = torch.cat([cache.transpose(1, 2).to(x.dtype), x], dim=1)  # [B, history + T, D]
        taps = self.weight[:, 0].float()  # [D, kernel_size]; tap kernel_size - 1 is the current token
        out = sum(padded[:, tap:tap + length].float() * taps[:, tap] for tap in range(history + 1))
        if self.bias is not None:
            out = out + self.bias.float()
        new_cache = padded[:, padded.shape[1] - history:].transpose(1, 2).contiguous()
        return F.silu(out.to(x.dtype)), new_cache
