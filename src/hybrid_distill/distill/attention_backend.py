"""Which of PyTorch's fused attention kernels the softmax layers' SDPA may pick (`HD_SDPA`), process-wide.

Why: on an H100 PyTorch picks cuDNN's kernels for the training step's attention, whose backward with its helpers
(dO·O, dQ's conversion to 16 bits, the GQA reduction of dK and dV) took 11 ms of the 114 ms all-softmax step at
head_dim 64 (session 28's profile). FlashAttention-2 (`flash`) reduces GQA heads in its own kernel. `auto` (the
default) leaves PyTorch's choice; the others enable only that fused kernel, with the math kernel kept as the
fallback for shapes it cannot take.

Compiled graphs bake the picked kernel in, and torch's compile caches (2.11-2.13) leave the SDPA flags out of their
keys: a process asking for flash would reuse another process's cuDNN graph from a shared TORCHINDUCTOR_CACHE_DIR
(session 29 timed exactly that). So a named choice is also written into `torch.compiler.config.cache_key_tag`.
"""
from __future__ import annotations

import os

import torch

SDPA_CHOICES = ("auto", "cudnn", "flash", "efficient")


def sdpa_choice() -> str:
    """`HD_SDPA`: auto, cudnn, flash or efficient. Set it before the process starts."""
    choice = os.environ.get("HD_SDPA", "auto")
    if choice not in SDPA_CHOICES:
        raise ValueError(f"HD_SDPA must be one of {', '.join(SDPA_CHOICES)}, not {choice!r}")
    return choice


def apply_sdpa_choice() -> str:
    """Enables the fused SDPA kernels `HD_SDPA` names (all of them under auto); returns the choice."""
    choice = sdpa_choice()
    if choice != "auto":
        torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
        torch.backends.cuda.enable_flash_sdp(choice == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(choice == "efficient")
        torch.backends.cuda.enable_math_sdp(True)
    _tag_compile_caches(choice)
    return choice


_TAG_PREFIX = "hd_sdpa="


def _tag_compile_caches(choice: str) -> None:
    """Keys compiled graphs by a named SDPA choice (auto keeps torch's own keys); other tags are kept beside it."""
    config = torch.compiler.config
    parts = [part for part in config.cache_key_tag.split(",") if part and not part.startswith(_TAG_PREFIX)]
    config.cache_key_tag = ",".join(parts + ([] if choice == "auto" else [_TAG_PREFIX + choice]))
