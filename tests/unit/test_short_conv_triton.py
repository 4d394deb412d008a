"""Our Triton short conv (models/mixers/short_conv_triton.py) computes the PyTorch conv's function, alone and inside
the mixers, checked on CPU with Triton's interpreter (the GPU run of the same kernels is
tests/gpu/test_mixer_kernels.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = r"""
import json, os, torch
from hybrid_distill.models.mixers import MixerSpec, make_mixer
from hybrid_distill.models.mixers.short_conv import ShortConvolution
from hybrid_distill.models.mixers import short_conv_triton
from hybrid_distill.models.mixers.short_conv_triton import BLOCK_T, ROWS_PER_PROGRAM, conv_silu

mixer_calls = []  # the shapes a mixer's forward passes to our kernel


def counted(x, weight, bias):
    mixer_calls.append(list(x.shape))
    return conv_silu(x, weight, bias)

torch.manual_seed(0)
worst = {}
os.environ["HD_CONV_GRADS_IN_PLACE"] = "off"  # the mixers' convs one call each, until the in-place part below

def record(name, got, want):
    worst[name] = max(worst.get(name, 0.0), (got - want).abs().max().item() / (want.abs().max().item() + 1e-12))

# one token, one tile, across tiles and partial-sum rows; a 2-tap conv (run as 4 taps, the first two zero); the row
# kernels reading 2 groups of 4 rows ahead, then 1 with the forward's programs 32 rows long
CASES = [(bias, length, 4) for bias in (False, True) for length in (1, 5, BLOCK_T + 6, ROWS_PER_PROGRAM + 6)]
WALKS = [(2, ROWS_PER_PROGRAM), (1, 32)]
for (bias, length, taps), (ahead, rows) in [(case, walk) for walk in WALKS for case in CASES + [(True, 9, 2)]]:
    short_conv_triton._PLAIN_TILES["forward_rows"].update(AHEAD=ahead, ROWS=rows)
    short_conv_triton._PLAIN_TILES["backward_rows"].update(AHEAD=ahead)
    conv = ShortConvolution(150, taps, bias=bias).double()
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    base = torch.randn(2, length, 157, dtype=torch.float64, requires_grad=True)
    x = base[..., 3:153]  # channels of a wider GEMM output, as the mixer passes them
    params = [base, conv.weight] + ([conv.bias] if bias else [])
    want, _ = conv(x)
    dy = torch.randn_like(want)
    got = conv_silu(x, conv.weight[:, 0], conv.bias)
    record(f"output, {ahead} ahead", got, want)
    for name, g, w in zip(("input", "taps", "bias"), torch.autograd.grad(got, params, dy),
                          torch.autograd.grad(want, params, dy)):
        record(f"{name}, {ahead} ahead", g, w)

for kind in ("gdn", "gla"):
    for padded in (False, True):
        mixer = make_mixer(MixerSpec(kind=kind, hidden_size=32, num_heads=2, head_dim=16), 0)
        with torch.no_grad():
            for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
                conv.weight.normal_()  # not the identity init, which would hide the conv
        hidden = torch.randn(2, 9, 32, requires_grad=True)
        if padded:
            mixer.padding_mask = torch.ones(2, 9, dtype=torch.long)
            mixer.padding_mask[1, :3] = 0
        runs = {}
        short_conv_triton.conv_silu = counted
        for choice in ("torch", "triton"):
            os.environ["HD_SHORT_CONV"] = choice
            out, _ = mixer(hidden)
            grads = torch.autograd.grad(out.square().sum(), [hidden, mixer.q_conv1d.weight, mixer.v_conv1d.weight])
            runs[choice] = (out, *grads)
        for name, got, want in zip(("mixer output", "mixer input grad", "q taps grad", "v taps grad"),
                                   runs["triton"], runs["torch"]):
            record(f"{kind} {name}", got, want)
# HD_CONV_GRADS_IN_PLACE=on: the three convs as one call that writes their gradients into the input GEMM's
from hybrid_distill.models.mixers import kernels
in_place_calls = []
original = kernels.projected_short_convs


def counted_in_place(projected, widths, weights):
    in_place_calls.append(widths)
    return original(projected, widths, weights)

kernels.projected_short_convs = counted_in_place
for kind in ("gdn", "gla"):
    torch.manual_seed(1)
    mixer = make_mixer(MixerSpec(kind=kind, hidden_size=32, num_heads=2, head_dim=16), 0)
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.normal_(0, 0.5)  # gates, convs and projections all away from their init
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    runs = {}
    for choice, in_place in (("torch", "off"), ("triton", "on")):
        os.environ["HD_SHORT_CONV"], os.environ["HD_CONV_GRADS_IN_PLACE"] = choice, in_place
        out, _ = mixer(hidden)
        names = ["hidden"] + [name for name, _ in mixer.named_parameters()]
        grads = torch.autograd.grad(out.square().sum(), [hidden] + list(mixer.parameters()))
        runs[choice] = [out, *grads]
    for name, got, want in zip(["output"] + names, runs["triton"], runs["torch"]):
        record(f"{kind} in place {name}", got, want)
os.environ["HD_CONV_GRADS_IN_PLACE"] = "off"
# columns past the listed blocks (a GEMM's padding) get an exact zero gradient, whatever the buffer held
projected = torch.randn(2, 9, 112, requires_grad=True)
taps = [torch.randn(32, 4) for _ in range(3)]
outputs = original(projected, [32, 32, 32, 4], taps)
grad, = torch.autograd.grad(sum((out * torch.randn_like(out)).sum() for out in outputs), projected)
padding_grad = grad[..., 100:].abs().max().item()
print(json.dumps({"worst": worst, "mixer_calls": mixer_calls, "in_place_calls": in_place_calls,
                  "padding_grad": padding_grad}))
"""


def test_triton_short_conv_equals_the_torch_conv_alone_and_inside_mixers(tmp_path):
    environ = {**os.environ, "TRITON_INTERPRET": "1", "HD_MIXER_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=environ, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    worst = result["worst"]
    # each mixer's forward ran its q, k and v convs in our kernel (2 x 9 tokens, 32 channels each)
    assert result["mixer_calls"] == [[2, 9, 32]] * 12
    assert set(worst) >= {f"{name}, {ahead} ahead" for name in ("output", "input", "taps", "bias") for ahead in (1, 2)}
    assert {"gdn mixer output", "gla q taps grad"} <= set(worst)
    # float32 sums inside the kernel against float64 (alone) or float32 (mixers) references
    # HD_CONV_GRADS_IN_PLACE=on ran one call per mixer forward over q, k, v (32 each) and the gates' columns; the
    # GDN output's 12 padding columns are not listed
    assert result["in_place_calls"] == [[32, 32, 32, 2, 2], [32, 32, 32, 16]]
    assert result["padding_grad"] == 0.0
    assert {"gdn in place hidden", "gdn in place a_proj.weight", "gdn in place q_conv1d.weight",
            "gla in place gk_proj.0.weight", "gla in place v_proj.weight"} <= set(worst)
    assert max(worst.values()) < 2e-5, worst
