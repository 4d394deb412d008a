"""Hybrid checkpoints: config.json (teacher config + `hybrid` section), safetensors weights, tokenizer.

A directory appears only complete: it is written beside its final name and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .student import HYBRID_CONFIG_KEY, MixerSpec, record_hybrid_config, replace_with_mixers

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or inconsistent; the message names it."""


def replace_directory(staging: Path, final: Path) -> None:
    """Swap a fully written staging directory into place (old content, if any, goes last)."""
    final = Path(final)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def save_hybrid(model, directory, tokenizer=None, extra_files: dict[str, dict] | None = None) -> Path:
    """Write model (+ tokenizer, + small JSON side files) to `directory` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    for name, payload in (extra_files or {}).items():
        (staging / name).write_text(json.dumps(payload, indent=2))
    if not (staging / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory}: save_pretrained wrote no {WEIGHTS_NAME}")
    replace_directory(staging, directory)
    return directory


def _read_config(directory: Path):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (config.json missing)")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory}/config.json is unreadable: {error}") from None


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{weights} is truncated or corrupt: {error}") from None


def load_hybrid(directory, dtype: torch.dtype = torch.float32, device="cpu"):
    """A transformers PreTrainedModel (works with `generate` and lm-eval's HFLM) from a hybrid checkpoint."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = _read_config(directory)
    section = getattr(config, HYBRID_CONFIG_KEY, None)
    if not isinstance(section, dict) or "softmax_layers" not in section:
        raise CheckpointError(f"{directory}/config.json has no '{HYBRID_CONFIG_KEY}' section")
    state = load_state_dict(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    total = config.num_hidden_layers
    if section.get("mixer"):
        spec = MixerSpec(**section["mixer"])
        linear = [i for i in range(total) if i not in set(section["softmax_layers"])]
        replace_with_mixers(model, linear, spec)
    else:
        spec = None
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the hybrid config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    record_hybrid_config(model, spec)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
