"""Runs a script that calls fla's real Triton kernels on CPU under Triton's interpreter, in its own process.

Two changes let fla's kernels run there, neither touching what they compute: autotuning takes each kernel's first
config (the interpreter has no benchmarker), and `range` in fla's kernels yields interpreter scalars (the kernels
call .to() on their loop counters, which Python ints lack).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PRELUDE = r"""
import builtins, sys
import triton.language as tl
from triton.runtime.autotuner import Autotuner


def first_config(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    self.best_config = config = self.configs[0]
    if config.pre_hook is not None:
        config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
    return self.fn.run(*args, **kwargs, **config.all_kwargs())


def counter_range(*bounds):
    for index in builtins.range(*[int(bound) for bound in bounds]):
        yield tl.full((), index, tl.int32)


Autotuner.run = first_config
import fla.ops.gated_delta_rule
for name, module in list(sys.modules.items()):
    if name.startswith("fla.ops"):
        module.range = counter_range
"""


def run_with_fla_interpreted(script: str, cwd) -> dict:
    """Run PRELUDE + `script` with TRITON_INTERPRET=1; the script prints one JSON object last, returned here."""
    environ = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + script], env=environ, capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
