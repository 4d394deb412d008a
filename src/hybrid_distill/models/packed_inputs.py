"""A module's input projections packed into one weight, for decode tokens: the weights become views into the packed
tensor (a non-persistent buffer of the module), and one GEMV reads it (evaluate/packed_projections.py says why and
packs whole models)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_WEIGHT = "packed_input_weight"
PACKED_BIAS = "packed_input_bias"


def packed_projections(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The packed GEMV's outputs, one per projection (padding dropped), for a decode token without autograd; None
    where the module is not packed or this call is not such a token."""
    weight = getattr(module, PACKED_WEIGHT, None)
    if weight is None or hidden_states.shape[1] != 1 or torch.is_grad_enabled():
        return None
    output = F.linear(hidden_states, weight, getattr(module, PACKED_BIAS))
    return output.split(module.packed_widths, dim=-1)[:module.packed_count]


def concatenated(linears, padding: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of `linears` stacked in order, with `padding` zero rows at the end: the one GEMM that computes
    them all. Zeros stand in for missing biases; no bias at all where none has one."""
    first = linears[0].weight
    pad = [first.new_zeros(padding, first.shape[1])] if padding else []
    weight = torch.cat([linear.weight for linear in linears] + pad)
    if not any(linear.bias is not None for linear in linears):
        return weight, None
    return weight, torch.cat([linear.bias if linear.bias is not None else first.new_zeros(linear.out_features)
                              for linear in linears] + [row[:, 0] for row in pad])


def pack_linears(module: nn.Module, linears, padding: int = 0) -> int:
    """Makes `linears`' weights and biases views into one packed weight and bias registered on `module` (zero rows
    of `padding` at the end); returns 1."""
    if still_packed(module, linears):
        return 1
    with torch.no_grad():
        weight, bias = concatenated(linears, padding)
    row = 0
    for linear in linears:
        rows = slice(row, row + linear.out_features)
        linear.weight.data = weight[rows]
        if linear.bias is not None:
            linear.bias.data = bias[rows]
        row = rows.stop
    module.register_buffer(PACKED_WEIGHT, weight, persistent=False)
    module.register_buffer(PACKED_BIAS, bias, persistent=False)
    module.packed_widths = [linear.out_features for linear in linears] + ([padding] if padding else [])
    module.packed_count = len(linears)
    return 1


def still_packed(module: nn.Module, linears) -> bool:
    """Whether every weight (and bias) is still the view of the module's packed tensors that pack_linears made."""
    weight, bias = getattr(module, PACKED_WEIGHT, None), getattr(module, PACKED_BIAS, None)
    if weight is None:
        return False
    row = 0
    for linear in linears:
        for param, packed in ((linear.weight, weight), (linear.bias, bias)):
            if param is None:
                continue
            if packed is None or param.data_ptr() != packed[row].data_ptr() or param.dtype != packed.dtype:
                return False
        row += linear.out_features
    return True
