"""One on-disk home for compiled kernels, shared by every job of every run.

A run is dozens of short jobs, and on a cluster each may land on a node that has never compiled anything. By default
Inductor keeps its compiled graphs and the Triton binaries of their kernels in node-local /tmp, and Triton and TileLang
keep fla's kernels under the home directory. So a job on a fresh node compiles its decoder layers again, and where
the home directory is not shared, fla's kernels too. On an H200, a 16-step all-GDN scoring job with the paper
configs' compile options took 161.5 s on a new node of a shared-home cluster and 46.4 s with this cache
(docs/performance.md, session 18). The workflow points all of them at one directory on the shared filesystem
(`kernel_cache` in the config), and keeps Triton's autotuning choices there as well, so every later job loads what the
first one compiled and picks the same kernel configurations, even when jobs sharing a GPU would time them differently.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

# environment variable -> subdirectory of the kernel cache
CACHE_DIRECTORIES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                     "TILELANG_CACHE_DIR": "tilelang"}  # fla's GDN backward on Hopper compiles a TileLang kernel
AUTOTUNE_RESULTS = "TRITON_CACHE_AUTOTUNING"  # Triton >= 3.3 keeps each autotuned kernel's choice in its cache
KERNEL_CACHE_VARIABLES = (*CACHE_DIRECTORIES, AUTOTUNE_RESULTS)  # every variable the workflow may set


def kernel_cache_environment(root: str | os.PathLike) -> dict[str, str]:
    """The variables that put compiled kernels under `root` (made absolute: jobs may start in other directories)."""
    root = Path(root).absolute()
    environment = {variable: str(root / sub) for variable, sub in CACHE_DIRECTORIES.items()}
    environment[AUTOTUNE_RESULTS] = "1"
    return environment


def export_kernel_cache(root: str | os.PathLike | None,
                        environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets each variable of kernel_cache_environment(root) that `environ` does not set already (a user's own
    choice wins); root None sets nothing. Returns what it set."""
    if root is None:
        return {}
    chosen = {variable: value for variable, value in kernel_cache_environment(root).items()
              if variable not in environ}
    environ.update(chosen)
    return chosen


def describe_kernel_cache(environ: MutableMapping[str, str] = os.environ) -> str:
    """One log line: where this process keeps compiled kernels."""
    parts = [f"{variable}={environ.get(variable, '(default)')}" for variable in KERNEL_CACHE_VARIABLES]
    return "compiled kernels: " + ", ".join(parts)
