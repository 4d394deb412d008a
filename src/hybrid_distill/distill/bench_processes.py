"""The benchmark under `accelerate launch --num_processes N` (or torchrun): one process per GPU, DDP-wrapped
objective, so the table's tokens/s of N processes against one is the data-parallel speed-up of a step.
On CPU the processes use gloo, which is how the tests run it."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hybrid_distill.distill.precision import train_on_cpu


@contextmanager
def bench_processes():
    """(rank, world size, device) of this process; joins and leaves the process group when launched as several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = train_on_cpu()
    if world == 1:
        yield 0, 1, torch.device("cpu" if on_cpu else "cuda")
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if on_cpu else "nccl")
    try:
        yield dist.get_rank(), world, device
    finally:
        dist.destroy_process_group()


def data_parallel(objective: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The objective as the trainer runs it on `world` processes: gradients all-reduced in backward."""
    if world == 1:
        return objective
    return DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)


def unwrapped(objective: torch.nn.Module) -> torch.nn.Module:
    return objective.module if isinstance(objective, DistributedDataParallel) else objective
