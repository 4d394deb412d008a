"""Export the teacher once per run as a plain HF directory (safetensors), so jobs skip GGUF conversion."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from hybrid_distill.models.teacher import TeacherError, load_teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_teacher(spec: str, out_dir, dtype: str = "float32", expect_layers: int | None = None) -> Path:
    """Write config, weights and tokenizer to `out_dir`, atomically (staged beside it, then renamed)."""
    model, tokenizer = load_teacher(spec, dtype=DTYPES[dtype])
    layers = model.config.num_hidden_layers
    if expect_layers is not None and layers != expect_layers:
        raise TeacherError(f"teacher {spec} has {layers} layers but teacher.num_layers says {expect_layers}")
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir
