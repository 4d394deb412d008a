"""Which side of tests/gpu/test_mixer_kernels.py's gap is the error: fla's kernels or the PyTorch twin (fp32)?
Both are compared with the PyTorch twin in float64 on the same random mixer. Run on the GPU from the repo root."""
import copy
import os
import sys

import torch

sys.path.insert(0, "tests/gpu")
from test_mixer_kernels import random_mixer, relative_error  # noqa: E402


def run(mixer, hidden, backend):
    os.environ["HD_MIXER_BACKEND"] = backend
    mixer.zero_grad()
    hidden = hidden.detach().clone().requires_grad_(True)
    out, _ = mixer(hidden)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)).sum().backward()
    return {"output": out.detach().double(), "grad_input": hidden.grad.double(),
            **{f"grad_{n}": p.grad.double() for n, p in mixer.named_parameters()}}


for kind in ("gdn", "gla"):
    for length in (64, 1000):
        mixer = random_mixer(kind)
        hidden = torch.randn(2, length, 256, device="cuda")
        fla, fp32 = run(mixer, hidden, "fla"), run(mixer, hidden, "torch")
        fp64 = run(copy.deepcopy(mixer).double(), hidden.double(), "torch")
        for name in fp64:
            print(kind, length, name, "fla-vs-fp64 %.2e torch32-vs-fp64 %.2e fla-vs-torch32 %.2e" % (
                relative_error(fla[name], fp64[name]), relative_error(fp32[name], fp64[name]),
                relative_error(fla[name], fp32[name])))
