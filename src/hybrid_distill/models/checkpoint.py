"""Hybrid checkpoints: config.json (teacher config + `hybrid` section), safetensors weights, tokenizer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .student import HYBRID_CONFIG_KEY, MixerSpec, record_hybrid_config, replace_with_mixers

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or inconsistent; the message names it."""


def save_hybrid(model, directory, tokenizer=None) -> Path:
    """Write model (+ tokenizer) into `directory`; the weights file is moved in last, so its presence means done.

    The directory may already hold other files of the job (training states, metrics); they are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.saving-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (directory / WEIGHTS_NAME).unlink(missing_ok=True)
    model.save_pretrained(staging, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if not (staging / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory}: save_pretrained wrote no {WEIGHTS_NAME}")
    names = sorted(p.name for p in staging.iterdir() if p.name != WEIGHTS_NAME) + [WEIGHTS_NAME]
    for name in names:
        os.replace(staging / name, directory / name)
    shutil.rmtree(staging, ignore_errors=True)
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
    from transformers.initialization import no_init_weights

    state = load_state_dict(directory)
    with no_init_weights():  # every weight comes from the file; random init of a 3B model would take minutes
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
