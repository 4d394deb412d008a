"""The workflow's shared kernel cache: which variables it sets, that a user's own choice wins, and that a second
process really loads the graphs a first one compiled there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hybrid_distill.kernel_cache import (
    KERNEL_CACHE_VARIABLES, describe_kernel_cache, export_kernel_cache, kernel_cache_environment,
)


def test_a_relative_cache_becomes_absolute_subdirectories_of_one_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environment = kernel_cache_environment("results/.kernel_cache")
    assert environment == {"TRITON_CACHE_DIR": str(tmp_path / "results/.kernel_cache/triton"),
                           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "results/.kernel_cache/inductor"),
                           "TILELANG_CACHE_DIR": str(tmp_path / "results/.kernel_cache/tilelang"),
                           "TRITON_CACHE_AUTOTUNING": "1"}


def test_export_sets_only_what_the_environment_leaves_unset(tmp_path):
    environ = {"TRITON_CACHE_DIR": "/users/own/triton", "PATH": "/bin"}
    chosen = export_kernel_cache(tmp_path / "cache", environ)
    assert environ["TRITON_CACHE_DIR"] == "/users/own/triton"
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert environ["TRITON_CACHE_AUTOTUNING"] == "1"
    assert set(chosen) == {"TORCHINDUCTOR_CACHE_DIR", "TILELANG_CACHE_DIR", "TRITON_CACHE_AUTOTUNING"}
    assert "TRITON_CACHE_DIR=/users/own/triton" in describe_kernel_cache(environ)


def test_no_kernel_cache_leaves_the_environment_alone():
    environ = {"PATH": "/bin"}
    assert export_kernel_cache(None, environ) == {}
    assert environ == {"PATH": "/bin"}
    assert "TORCHINDUCTOR_CACHE_DIR=(default)" in describe_kernel_cache(environ)


COMPILE_ONCE = """
import json, torch
from hybrid_distill.distill.bench import compiled_graph_counts
step = torch.compile(lambda x: (x.sin() * 3 + 1).relu())
x = torch.ones(5, requires_grad=True)
step(x).sum().backward()
print(json.dumps(compiled_graph_counts()))
"""


def test_a_second_process_loads_the_graphs_the_first_compiled_into_the_cache(tmp_path):
    """What a job on a fresh node gains: with the exported variables, a second process compiles nothing."""
    environ = {key: value for key, value in os.environ.items() if key not in KERNEL_CACHE_VARIABLES}
    export_kernel_cache(tmp_path / "kernel_cache", environ)

    def counts():
        done = subprocess.run([sys.executable, "-c", COMPILE_ONCE], env=environ, capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = counts(), counts()
    assert first.get("inductor.fxgraph_cache_miss", 0) >= 1 and not first.get("inductor.fxgraph_cache_hit")
    assert second.get("inductor.fxgraph_cache_hit", 0) >= 1 and not second.get("inductor.fxgraph_cache_miss")
    assert any((tmp_path / "kernel_cache" / "inductor").iterdir())
