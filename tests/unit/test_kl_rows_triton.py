"""Our two-pass KL kernel (distill/kl_rows_triton.py, `HD_KL_ROWS=triton`) computes fused_kl's chunk maths, alone
and inside the chunked KL, checked on CPU with Triton's interpreter (tests/gpu/test_compiled_kl_cuda.py runs it on
a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden, kl_teacher_rows

CHECK = r"""
import json, os, weakref, torch
from hybrid_distill.distill import fused_kl, kl_rows_triton
from hybrid_distill.distill.fused_kl import _kl_rows, chunked_kl_from_hidden
from hybrid_distill.distill.kl_rows_triton import _PLAIN_CONFIG, kl_rows

block = _PLAIN_CONFIG["BLOCK"]
generator = torch.Generator().manual_seed(0)
worst = {}


def record(name, got, want):
    worst[name] = max(worst.get(name, 0.0), (got - want).abs().max().item() / (want.abs().max().item() + 1e-30))


# vocabularies inside one block, ending inside the last of several, and a whole number of blocks; logits that rise
# along the row (each block raises both running maxima) and that fall; scalar and per-row scales; token weights
for case, (vocab, temperature, trend, weighted, per_row) in enumerate([
        (7, 1.0, 0.0, False, False), (3 * block + 5, 2.0, 40.0, True, True), (2 * block, 0.5, -40.0, True, False)]):
    rows = 5
    ramp = torch.linspace(0.0, trend, vocab)
    student = (3.0 * torch.randn(rows, vocab, generator=generator) + ramp).to(torch.bfloat16)
    teacher = (3.0 * torch.randn(rows, vocab, generator=generator) + 0.5 * ramp).to(torch.bfloat16)
    weights = torch.rand(rows, generator=generator) if weighted else None
    scale = torch.rand(rows, 1, generator=generator) if per_row else torch.tensor(0.37)
    want_loss, want_grad = _kl_rows(student.double(), teacher.double(), temperature,
                                    None if weights is None else weights.double(), scale.double(), torch.float64)
    loss, grad = kl_rows(student, teacher, temperature, weights, scale, torch.bfloat16)
    record(f"loss {case}", loss.double(), want_loss)
    record(f"grad {case}", grad.double(), want_grad)
    worst[f"grad dtype {case}"] = str(grad.dtype)
    loss_only, no_grad = kl_rows(student, teacher, temperature, weights, None, torch.bfloat16)
    record(f"loss without grad {case}", loss_only.double(), want_loss)
    worst[f"grad without scale {case}"] = no_grad

# the gradient written over the student's logits (grad_out aliasing them) is the one written to a buffer of its own
overwritten = student.clone()
loss_in_place, grad_in_place = kl_rows(overwritten, teacher, temperature, weights, scale, torch.bfloat16,
                                       grad_out=overwritten)
worst["in place equal"] = (torch.equal(grad_in_place, grad) and torch.equal(loss_in_place, loss)
                           and grad_in_place.data_ptr() == overwritten.data_ptr())
try:
    kl_rows(student, teacher, temperature, weights, scale, torch.bfloat16, grad_out=student.float())
except ValueError as error:
    worst["wrong grad_out"] = str(error)

# programs looping over the rows (PROGRAMS_PER_SM > 0): 5 rows on 2 programs give what one program per row gives
one_per_row = kl_rows(student, teacher, temperature, weights, scale, torch.bfloat16)
_PLAIN_CONFIG["PROGRAMS_PER_SM"] = 1
kl_rows_triton._sm_count = lambda device: 2
looping = kl_rows(student, teacher, temperature, weights, scale, torch.bfloat16)
_PLAIN_CONFIG["PROGRAMS_PER_SM"] = 0
worst["looping programs equal"] = all(torch.equal(a, b) for a, b in zip(looping, one_per_row, strict=True))

# the chunked KL from hidden states with the kernel as its compiled maths, against its eager maths
os.environ["HD_KL_ROWS"] = "triton"
called, written_over = [], []
kernel = kl_rows_triton.kl_rows


def counted(*args, **options):
    called.append(tuple(args[0].shape))
    grad_out = options.get("grad_out")
    written_over.append(grad_out is not None and grad_out.data_ptr() == args[0].data_ptr())
    return kernel(*args, **options)

kl_rows_triton.kl_rows = counted

# [rows x vocab] logits still held whenever the next ones are made: the chunk's working set
made_logits, held_at_make = [], []
make_logits = fused_kl._logits


def tracked_logits(*args):
    held_at_make.append(sum(logits() is not None for logits in made_logits))
    logits = make_logits(*args)
    made_logits.append(weakref.ref(logits))
    return logits

fused_kl._logits = tracked_logits
hidden = torch.randn(13, 6, generator=generator, requires_grad=True)
weight = torch.randn(3 * block + 3, 6, generator=generator, requires_grad=True)
teacher_hidden = torch.randn(13, 7, generator=generator)
teacher_weight = torch.randn(3 * block + 3, 7, generator=generator)
mask = (torch.arange(13) % 3 != 1).float()
results = {}
# eager maths, then the kernel with the teacher's logits 2 rows at a time (the chunks' 5, 5 and 3 rows in parts of
# 2, 2 and 1), then the whole chunk at once
for name, teacher_rows in (("eager", None), ("parts", "2"), ("whole", "0")):
    if teacher_rows is not None:
        os.environ["HD_KL_TEACHER_ROWS"] = teacher_rows
    loss = chunked_kl_from_hidden(hidden, weight, teacher_hidden, teacher_weight, temperature=2.0, chunk_tokens=5,
                                  token_mask=mask, compiled=teacher_rows is not None)
    results[name] = (loss, *torch.autograd.grad(loss, [hidden, weight]))
    if name == "parts":
        worst["logits held at make"] = max(held_at_make)
for kernel_run in ("parts", "whole"):
    for name, got, want in zip(("loss", "hidden grad", "weight grad"), results[kernel_run], results["eager"]):
        record(f"chunked {name} {kernel_run}", got, want)
print(json.dumps({"worst": worst, "called": called, "written_over": written_over}))
"""


def test_kernel_computes_the_chunk_maths_alone_and_inside_the_chunked_kl(tmp_path):
    environ = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=environ, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    worst = result["worst"]
    assert worst.pop("looping programs equal") is True
    assert worst.pop("in place equal") is True
    # each part's teacher logits were freed before the next were made, and each chunk's before the next chunk's:
    # only the student's logits of the chunk (holding its gradient) were held when teacher logits were made
    assert worst.pop("logits held at make") == 1
    assert worst.pop("wrong grad_out").startswith("grad_out must be a [5, 2048] torch.bfloat16 tensor")
    for case in range(3):
        assert worst.pop(f"grad dtype {case}") == "torch.bfloat16"
        assert worst.pop(f"grad without scale {case}") is None
    # the chunked KL's compiled maths went to the kernel once per part of 2 teacher rows in the chunks of 5, 5 and 3
    # tokens (vocab 3 blocks + 3), then once per whole chunk
    parts = [[2, 3075], [2, 3075], [1, 3075]] * 2 + [[2, 3075], [1, 3075]]
    assert result["called"] == parts + [[5, 3075], [5, 3075], [3, 3075]]
    assert all(result["written_over"])  # every gradient went over the student's logits it was computed from
    assert {"loss 1", "grad 1", "loss without grad 2", "chunked weight grad parts",
            "chunked hidden grad whole"} <= set(worst)
    # float32 sums in the kernel against float64 (alone, the gradient rounded to bf16) or float32 (chunked) maths
    gradients = {name: error for name, error in worst.items() if name.startswith("grad")}
    assert max(gradients.values()) < 8e-3, gradients  # bf16's half ulp is 3.9e-3 of the largest value
    assert max(error for name, error in worst.items() if name not in gradients) < 2e-5, worst


def test_an_unknown_kernel_choice_is_named(monkeypatch):
    monkeypatch.setenv("HD_KL_ROWS", "fast")
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(11, 3)
    with pytest.raises(ValueError, match="HD_KL_ROWS must be one of compiled, triton, triton_loop, not 'fast'"):
        chunked_kl_from_hidden(hidden, weight, torch.randn(4, 3), weight, compiled=True)


def test_a_bad_teacher_row_count_is_named(monkeypatch):
    monkeypatch.setenv("HD_KL_TEACHER_ROWS", "-1")
    with pytest.raises(ValueError, match="HD_KL_TEACHER_ROWS must be a whole number of rows"):
        kl_teacher_rows()


def test_a_cpu_without_the_interpreter_keeps_inductors_maths(monkeypatch):
    from hybrid_distill.distill import kl_rows_triton

    def unreachable(*args):
        raise AssertionError("our kernel cannot run on a CPU without TRITON_INTERPRET=1")

    monkeypatch.setattr(kl_rows_triton, "kl_rows", unreachable)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight = torch.randn(4, 3), torch.randn(11, 3)
    losses = {}
    for choice in ("compiled", "triton"):
        monkeypatch.setenv("HD_KL_ROWS", choice)
        losses[choice] = chunked_kl_from_hidden(hidden, weight, torch.randn(4, 3, generator=torch.Generator()
                                                                           .manual_seed(1)), weight, compiled=True)
    assert losses["triton"].item() == losses["compiled"].item() > 0


def test_triton_loop_autotunes_looping_programs_besides_one_per_row(monkeypatch):
    """HD_KL_ROWS=triton_loop hands our kernel `looping`, whose candidates add programs that loop over the rows;
    the default's candidates all give each row its own program (the looping ones wait for a GPU check)."""
    from hybrid_distill.distill import kl_rows_triton
    from hybrid_distill.distill.fused_kl import _our_kernel

    cuda = torch.device("cuda")  # only the choice is made here: nothing is launched
    for choice, looping in (("triton", False), ("triton_loop", True)):
        monkeypatch.setenv("HD_KL_ROWS", choice)
        chosen = _our_kernel(torch.float32, cuda)
        assert chosen.func is kl_rows_triton.kl_rows and chosen.keywords == {"looping": looping}
    programs = {config.kwargs["PROGRAMS_PER_SM"] for config in kl_rows_triton._configs()}
    looping_programs = {config.kwargs["PROGRAMS_PER_SM"] for config in kl_rows_triton._configs(looping=True)}
    assert programs == {0} and looping_programs == {0, 1, 2, 4}
