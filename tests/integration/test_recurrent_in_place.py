"""A GDN decode step through fla's recurrent kernel with the new state written over the old one
(models/mixers/recurrent_in_place.py) gives what fla's own op gives with a new state tensor: checked on CPU through
fla's real Triton kernel under Triton's interpreter (the GPU run is tests/gpu/test_static_decode_cuda.py)."""
from __future__ import annotations

import pytest
from fla_interpreter import run_with_fla_interpreted

CHECK = r"""
import json, torch
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
from hybrid_distill.models.mixers.recurrent_in_place import gated_delta_step_in_place

torch.manual_seed(0)
batch, heads, dim, value_dim = 2, 3, 64, 32
report = {}
for length, normalize in ((1, False), (3, True)):
    unit = (lambda x: x) if normalize else (lambda x: torch.nn.functional.normalize(x, dim=-1))
    q, k = unit(torch.randn(batch, length, heads, dim)), unit(torch.randn(batch, length, heads, dim))
    v = torch.randn(batch, length, heads, value_dim)
    g, beta = -torch.rand(batch, length, heads) * 0.2, torch.rand(batch, length, heads)
    state = torch.randn(batch, heads, dim, value_dim)
    flas_out, flas_state = fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=dim ** -0.5,
                                                            initial_state=state.clone(), output_final_state=True,
                                                            use_qk_l2norm_in_kernel=normalize)
    buffer = state.clone()
    address = buffer.data_ptr()
    ours = gated_delta_step_in_place(q, k, v, g, beta, dim ** -0.5, buffer, normalize)
    report[f"{length} tokens"] = {"output": (ours - flas_out).abs().max().item(),
                                  "state": (buffer - flas_state).abs().max().item(),
                                  "state moved": (buffer - state).abs().max().item(),
                                  "same buffer": buffer.data_ptr() == address}
print(json.dumps(report))
"""


def test_in_place_step_gives_flas_output_and_state_on_cpu(tmp_path):
    report = run_with_fla_interpreted(CHECK, tmp_path)
    assert set(report) == {"1 tokens", "3 tokens"}
    for tokens, found in report.items():
        assert found["same buffer"], tokens
        assert found["state moved"] > 1e-3, tokens  # the step really wrote the buffer
        assert found["output"] <= 1e-6 and found["state"] <= 1e-6, (tokens, found)


def test_in_place_step_refuses_a_state_it_cannot_write():
    import torch

    from hybrid_distill.models.mixers.recurrent_in_place import gated_delta_step_in_place

    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="contiguous float32"):
        gated_delta_step_in_place(q, q, q, q[..., 0], q[..., 0], 0.5, torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="state of shape"):
        gated_delta_step_in_place(q, q, q, q[..., 0], q[..., 0], 0.5, torch.zeros(1, 3, 4, 4))
