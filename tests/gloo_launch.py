"""Two-process CPU launches (`accelerate launch` over gloo), for tests of the data-parallel paths."""
from __future__ import annotations

import socket
import sys

import pytest
import torch

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is needed for a 2-process CPU run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_launcher() -> list[str]:
    """`accelerate launch` for 2 processes on this host, on a free port; append the module or script to run."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]
