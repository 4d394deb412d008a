"""Distillation jobs as the workflow runs them: load inputs, build the objective, train, write outputs last."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from hybrid_distill.data.packed import PackedTokens
from hybrid_distill.distill.atomic import write_text_atomic
from hybrid_distill.distill.objectives import HiddenAlignment, LogitDistillation, heldout_kl, heldout_layer_mse
from hybrid_distill.distill.trainer import TrainSettings, train
from hybrid_distill.models.checkpoint import load_hybrid, save_hybrid
from hybrid_distill.models.student import build_student, restore_softmax_layers, softmax_layers_of
from hybrid_distill.models.teacher import load_teacher

log = logging.getLogger(__name__)
MIXER_OPTION_KEYS = ("use_short_conv", "conv_size", "use_output_gate", "allow_neg_eigval")
EVAL_BATCH = 8


def train_settings(stage: dict, seed: int) -> TrainSettings:
    """TrainSettings from a validated stage section of the config."""
    return TrainSettings(
        token_budget=stage["tokens"], micro_batch_size=stage["micro_batch_size"], grad_accum=stage["grad_accum"],
        lr=stage["lr"], min_lr_ratio=stage["min_lr_ratio"], warmup_steps=stage["warmup_steps"],
        schedule=stage["schedule"], weight_decay=stage["weight_decay"], max_grad_norm=stage["max_grad_norm"],
        save_every=stage["save_every"], seed=seed)


def stage_section(config: dict, key: str) -> dict:
    """`distill.stage1`, `distill.stage2` or `scoring.stage2`."""
    group, name = key.split(".")
    return config[group][name]


def write_json(path: Path, payload: dict) -> None:
    write_text_atomic(Path(path), json.dumps(payload, indent=2) + "\n")


def open_data(data_dir: Path, split: str) -> PackedTokens:
    return PackedTokens(Path(data_dir) / f"{split}.bin")


def drop_training_state(out_dir: Path) -> None:
    """A finished job's model is its output; its resumable state (weights + AdamW moments) is only disk cost.

    Renamed before it is deleted, so a kill mid-delete never leaves a state that looks complete to a rerun.
    """
    state = Path(out_dir) / "state"
    if not state.exists():
        return
    retired = state.with_name(".state.retired")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(state, retired)
    shutil.rmtree(retired)


def distill_all_linear_stage1(config: dict, teacher_dir: Path, data_dir: Path, mixer: str, out_dir: Path) -> None:
    """Stage 1 of the all-linear student; also records each layer's held-out alignment error (GA-S1 signal)."""
    teacher, tokenizer = load_teacher(str(teacher_dir))
    options = {key: config["mixer"][key] for key in MIXER_OPTION_KEYS}
    student = build_student(teacher, [], mixer, **options)
    objective = HiddenAlignment(student, teacher)
    result = train(objective, open_data(data_dir, "train"), train_settings(config["distill"]["stage1"], config["seed"]),
                   Path(out_dir), clip_groups=objective.clip_groups(), description=f"stage1 all-linear {mixer}")
    student = result.objective.student.cpu()
    teacher = result.objective.teacher.cpu()
    layer_mse = heldout_layer_mse(student, teacher, open_data(data_dir, "heldout"),
                                  config["scoring"]["heldout_sequences"], EVAL_BATCH)
    write_json(Path(out_dir) / "layer_mse.json", {"mixer": mixer, "layer_mse": {str(k): v for k, v in layer_mse.items()}})
    save_hybrid(student, out_dir, tokenizer)
    drop_training_state(out_dir)


def distill_stage2(config: dict, stage_key: str, teacher_dir: Path, data_dir: Path, init_dir: Path,
                   softmax_layers: list[int], out_dir: Path, stop_after_step: int | None = None,
                   score_path: Path | None = None, save_model: bool = True) -> dict:
    """Stage 2 from a stage-1 student with `softmax_layers` restored to the teacher's attention.

    Serves every stage-2 job: all-linear, one-swap rounds (stop_after_step + score_path, no model), greedy
    removal and final hybrids. The score is the held-out KL after the trained steps.
    """
    teacher, tokenizer = load_teacher(str(teacher_dir))
    student = load_hybrid(init_dir)
    restore_softmax_layers(student, teacher, softmax_layers)
    trainable = config["scoring"]["trainable"] if stage_key == "scoring.stage2" else "all"
    objective = LogitDistillation(student, teacher, config["distill"]["temperature"],
                                  config["distill"]["kl_chunk_tokens"], trainable)
    settings = train_settings(stage_section(config, stage_key), config["seed"])
    out_dir = Path(out_dir)
    result = train(objective, open_data(data_dir, "train"), settings, out_dir, stop_after_step=stop_after_step,
                   description=f"stage2 {out_dir.parent.name}/{out_dir.name}")
    student, teacher = result.objective.student, result.objective.teacher
    tokens_per_step = result.tokens // max(result.step, 1)
    score = {"softmax_layers": softmax_layers_of(student), "step": result.step, "tokens": result.tokens,
             "train_loss": result.loss, "budget_exhausted": result.tokens + tokens_per_step > settings.token_budget}
    if score_path is not None:
        score["heldout_kl"] = heldout_kl(student, teacher, open_data(data_dir, "heldout"),
                                         config["scoring"]["heldout_sequences"], EVAL_BATCH,
                                         config["distill"]["temperature"], config["distill"]["kl_chunk_tokens"])
        write_json(score_path, score)
    if save_model:
        save_hybrid(student.cpu(), out_dir, tokenizer)
        drop_training_state(out_dir)
    return score
