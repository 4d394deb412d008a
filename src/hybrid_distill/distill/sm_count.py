"""How many SMs (streaming multiprocessors) a device has: our Triton kernels whose programs loop over rows size their
grids by it."""
from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """Queried once per device (the kernels run every step); 1 on a CPU (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
