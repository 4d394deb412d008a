"""The MFU a step could reach if everything but its weight matmuls were free: each nn.Linear of the student
(forward, input-gradient and weight-gradient GEMMs when it trains) and of the teacher (forward) is timed alone at
the step's shapes in bf16. At small hidden sizes these GEMMs themselves run below the matmul rate the MFU is
measured against (59-66% of it at SmolLM2's shapes and 32k tokens per step), a bound that no fusion of the other
kernels can lift; the gap between this ceiling and the measured MFU is what such fusion could win."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Gemm:
    """One matmul of a step: [rows x inner] @ [inner x cols]."""
    rows: int
    inner: int
    cols: int

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inner * self.cols


def linear_gemms(student: nn.Module, teacher: nn.Module, tokens: int, teacher_body: bool = True) -> list[Gemm]:
    """Every weight GEMM of one step on `tokens` tokens. A trained linear runs three (y = x W^T, dx = dy W,
    dW = dy^T x), a frozen one only its forward; `teacher_body=False` (a teacher cache) leaves the teacher's
    head alone."""
    gemms = []
    for module in _linears(student):
        out_features, in_features = module.weight.shape
        gemms.append(Gemm(tokens, in_features, out_features))
        if module.weight.requires_grad:
            gemms += [Gemm(tokens, out_features, in_features), Gemm(out_features, tokens, in_features)]
    teacher_linears = _linears(teacher) if teacher_body else [teacher.get_output_embeddings()]
    gemms += [Gemm(tokens, module.weight.shape[1], module.weight.shape[0]) for module in teacher_linears]
    return gemms


def _linears(model: nn.Module) -> list[nn.Linear]:
    seen, linears = set(), []
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in seen:
            seen.add(id(module))
            linears.append(module)
    return linears


def time_gemms(gemms: list[Gemm], device: torch.device, dtype=torch.bfloat16, repeats: int = 5,
               calls: int = 10) -> float:
    """Seconds the GEMMs take one after another: each shape timed once, as the median over `repeats` of
    `calls` back-to-back launches (so that a synchronisation does not count as a small GEMM's time)."""
    seconds = {}
    for gemm in set(gemms):
        left = torch.randn(gemm.rows, gemm.inner, device=device, dtype=dtype)
        right = torch.randn(gemm.inner, gemm.cols, device=device, dtype=dtype)
        left @ right
        samples = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                left @ right
            _synchronize(device)
            samples.append((time.perf_counter() - start) / calls)
        seconds[gemm] = statistics.median(samples)
        del left, right
    return sum(seconds[gemm] for gemm in gemms)


def _synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
