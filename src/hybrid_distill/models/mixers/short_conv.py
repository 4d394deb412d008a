"""Causal depthwise convolution with a decoding cache, state_dict-compatible with fla's ShortConvolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
