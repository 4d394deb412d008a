"""HD_GDN_KEEP_STATES (models/mixers/gdn_kept_states.py) runs fla's own GDN kernels in fla's order and keeps w, h and
the updated values for backward: checked on CPU against fla's chunk_gated_delta_rule, both through fla's real
Triton kernels under Triton's interpreter (the GPU run is tests/gpu/test_mixer_kernels.py)."""
from __future__ import annotations

from fla_interpreter import run_with_fla_interpreted

CHECK = r"""
import json, torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from hybrid_distill.models.mixers.gdn_kept_states import gated_delta_rule_kept_states

torch.manual_seed(0)
batch, length, heads, dim = 1, 100, 2, 64  # a length that ends inside fla's second chunk
unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
inputs = [unit(torch.randn(batch, length, heads, dim)), unit(torch.randn(batch, length, heads, dim)),
          torch.randn(batch, length, heads, dim), -torch.rand(batch, length, heads) * 0.2,
          torch.rand(batch, length, heads), torch.randn(batch, heads, dim, dim)]
d_out = torch.randn(batch, length, heads, dim)
results = []
for rule in (chunk_gated_delta_rule, gated_delta_rule_kept_states):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out, final = rule(q=leaves[0], k=leaves[1], v=leaves[2], g=leaves[3], beta=leaves[4], scale=dim ** -0.5,
                      initial_state=leaves[5], output_final_state=True)
    grads = torch.autograd.grad((out * d_out).sum() + final.square().sum(), leaves)
    results.append([out, final, *grads])
names = ["output", "final state", "dq", "dk", "dv", "dg", "dbeta", "d state"]
print(json.dumps({name: [(ours - flas).abs().max().item(), flas.abs().max().item()]
                  for name, ours, flas in zip(names, results[1], results[0])}))
"""


def test_kept_states_rule_gives_flas_outputs_and_gradients_on_cpu(tmp_path):
    differences = run_with_fla_interpreted(CHECK, tmp_path)
    assert set(differences) == {"output", "final state", "dq", "dk", "dv", "dg", "dbeta", "d state"}
    for name, (difference, size) in differences.items():
        assert size > 0.1, name  # a real value, not an empty gradient
        assert difference <= 1e-6 * size, (name, difference, size)  # the same kernels on the same inputs
