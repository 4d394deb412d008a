"""bf16 student weights with float32 master copies in the optimizer (`distill.bf16_weights`).

Under autocast, float32 weights are recast to bf16 at every use and the residual stream stays float32: at small
hidden sizes those casts and float32 elementwise kernels are a large share of a step. With bf16 weights the model
computes in bf16 throughout, while AdamW updates float32 copies and writes them back rounded: an update below
bf16's resolution (about 0.4% of a weight) would otherwise be lost, which at stage 2's learning rates is most.
"""
from __future__ import annotations

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "master_weights"  # where the float32 copies sit in the optimizer's state dict


def cast_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast `module`'s parameters (not its buffers: rotary frequencies stay float32) in place; returns how many.
    Tied weights are one parameter, cast once."""
    params = list(module.parameters())
    for param in params:
        param.data = param.data.to(dtype)
    return len(params)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose parameters are float32 copies of low-precision model parameters.

    `step` takes the model's gradients (cast to float32), updates the copies and writes them back into the model;
    `zero_grad` clears the model's gradients. The copies travel in the state dict, so a resumed run continues
    from the exact float32 weights rather than their rounded bf16 values.
    """

    def __init__(self, model_params, **adamw_options):
        self.model_params = list(model_params)
        if not self.model_params:
            raise ValueError("MasterWeightAdamW got no parameters")
        masters = [param.detach().to(torch.float32).clone() for param in self.model_params]
        super().__init__(masters, **adamw_options)
        self.masters = masters
        for master in masters:
            master.grad = torch.zeros_like(master)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        master_grads, model_grads = [], []
        for master, param in zip(self.masters, self.model_params):
            if param.grad is None:
                master.grad = None  # AdamW skips it, as it would the model parameter
                continue
            if master.grad is None:
                master.grad = torch.zeros_like(master)
            master_grads.append(master.grad)
            model_grads.append(param.grad)
        if master_grads:
            torch._foreach_copy_(master_grads, model_grads)
        super().step()
        torch._foreach_copy_(self.model_params, self.masters)

    def zero_grad(self, set_to_none: bool = True):
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self):
        return {**super().state_dict(), MASTER_KEY: list(self.masters)}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop(MASTER_KEY, None)
        if masters is None or len(masters) != len(self.masters):
            raise ValueError(f"the optimizer state holds no float32 master weights for its {len(self.masters)} "
                             "parameters: it was saved without distill.bf16_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            torch._foreach_copy_(self.masters, [master.to(self.masters[0].device) for master in masters])
            torch._foreach_copy_(self.model_params, self.masters)


def adamw_for(params: list[nn.Parameter], **adamw_options) -> torch.optim.AdamW:
    """Plain AdamW for float32 parameters, master-weight AdamW when any is bf16/fp16 (never AdamW on rounded
    weights). Mixed precisions are refused: one model, one weight precision."""
    dtypes = {param.dtype for param in params}
    if not dtypes & set(LOW_PRECISION):
        return torch.optim.AdamW(params, **adamw_options)
    if len(dtypes) > 1:
        raise ValueError(f"trainable parameters mix dtypes {sorted(map(str, dtypes))}: cast all of them or none "
                         "(distill.bf16_weights)")
    return MasterWeightAdamW(params, **adamw_options)
