"""The device and numeric context training runs in, in one place, so that a teacher cache is computed in the
very same one as the jobs that read it."""
from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env


def train_on_cpu() -> bool:
    """CPU when asked (ACCELERATE_USE_CPU) or when there is no GPU."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def mixed_precision(on_cpu: bool) -> str:
    """Accelerate's setting: bf16 autocast on GPUs, none on CPU."""
    return "no" if on_cpu else "bf16"


def training_autocast_dtype(on_cpu: bool) -> torch.dtype | None:
    """The autocast dtype Accelerate applies under `mixed_precision(on_cpu)`; None for no autocast."""
    return None if mixed_precision(on_cpu) == "no" else torch.bfloat16


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type` right now, None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU copy that does not make the host wait (pinned staging, non_blocking); a plain move elsewhere.
    The caching host allocator keeps the pinned buffer alive until the copy has run."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
