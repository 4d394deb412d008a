"""Open any model directory the evaluation sees: a hybrid checkpoint or a plain teacher from save_pretrained."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from hybrid_distill.models.checkpoint import CheckpointError, _read_config, load_hybrid, load_tokenizer
from hybrid_distill.models.student import HYBRID_CONFIG_KEY

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """"auto" is bfloat16 on a GPU (what users deploy and what fla's kernels are tuned for) and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means the GPU when there is one: evaluation should not fall back to CPU on a GPU node unasked."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_evaluation(directory, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None):
    """The model in eval mode from `directory`; a config.json without a `hybrid` section is a plain model."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = _read_config(directory)
    if isinstance(getattr(config, HYBRID_CONFIG_KEY, None), dict):
        model = load_hybrid(directory, dtype=torch_dtype, device=torch_device)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
        except OSError as error:
            raise CheckpointError(f"{directory}: cannot load the model weights ({error})") from None
        model = model.to(torch_device).eval()
    log.info("loaded %s (%s, %s) for evaluation", directory, torch_dtype, torch_device)
    return model.requires_grad_(False)


def load_evaluation_tokenizer(directory):
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory}: no usable tokenizer (save the checkpoint with its tokenizer): "
                              f"{str(error).splitlines()[0]}") from None
