"""Distillation jobs as the workflow runs them: load inputs, build the objective, train, write outputs last."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from hybrid_distill.data.packed import PackedTokens
from hybrid_distill.distill.atomic import drop_training_state, write_json
from hybrid_distill.distill.attention_backend import apply_sdpa_choice
from hybrid_distill.distill.compiled_blocks import compile_training_layers, set_activation_memory_budget
from hybrid_distill.distill.master_weights import cast_weights
from hybrid_distill.distill.merged_projections import merge_input_projections
from hybrid_distill.distill.objectives import (
    HeldoutTeacher, HiddenAlignment, LogitDistillation, heldout_kl, heldout_layer_mse,
)
from hybrid_distill.distill.precision import train_on_cpu, training_autocast_dtype
from hybrid_distill.distill.teacher_cache import (TeacherCache, sequences_to_cache, teacher_fingerprint,
                                                  write_teacher_cache)
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


def open_data(data_dir: Path, split: str) -> PackedTokens:
    return PackedTokens(Path(data_dir) / f"{split}.bin")


def distill_all_linear_stage1(config: dict, teacher_dir: Path, data_dir: Path, mixer: str, out_dir: Path) -> None:
    """Stage 1 of the all-linear student; also records each layer's held-out alignment error (GA-S1 signal)."""
    teacher, tokenizer = load_teacher(str(teacher_dir))
    options = {key: config["mixer"][key] for key in MIXER_OPTION_KEYS}
    student = build_student(teacher, [], mixer, **options)
    objective = HiddenAlignment(student, teacher)
    result = train(objective, open_data(data_dir, "train"), train_settings(config["distill"]["stage1"], config["seed"]),
                   Path(out_dir), clip_groups=objective.clip_groups(), description=f"stage1 all-linear {mixer}",
                   cuda_graphs=config["distill"]["cuda_graphs"])
    student = result.objective.student.cpu()
    teacher = result.objective.teacher.cpu()
    layer_mse = heldout_layer_mse(student, teacher, open_data(data_dir, "heldout"),
                                  config["scoring"]["heldout_sequences"], EVAL_BATCH)
    write_json(Path(out_dir) / "layer_mse.json", {"mixer": mixer, "layer_mse": {str(k): v for k, v in layer_mse.items()}})
    save_hybrid(student, out_dir, tokenizer)
    drop_training_state(out_dir)


def stage2_objective(distill: dict, student, teacher, trainable: str, cache=None) -> LogitDistillation:
    """Stage 2's loss with the `distill` section's speed and memory options applied to the student."""
    if distill["bf16_weights"]:
        cast_weights(student, torch.bfloat16)  # the trainer then keeps float32 master copies (master_weights.py)
    budget, budgeted_layers = distill["activation_memory_budget"], distill["activation_memory_budget_layers"]
    # read by the compiled code's partitioner: everywhere, or (with a layer count) only in those layers' code
    set_activation_memory_budget(budget if budgeted_layers is None else 1.0)
    apply_sdpa_choice()  # HD_SDPA: which fused attention kernels the softmax layers may use
    if distill["compile_blocks"]:  # before the objective, whose recomputation (if on) wraps the compiled layers
        merge_input_projections(student)  # q/k/v and gate/up as one GEMM each, if HD_MERGED_PROJECTIONS=on
        compile_training_layers(student, budgeted_layers or 0, budget)
        merge_input_projections(teacher)
        compile_training_layers(teacher)  # the teacher's forward layers: 2N of the step's 8N FLOPs
    objective = LogitDistillation(student, teacher, distill["temperature"], distill["kl_chunk_tokens"], trainable,
                                  teacher_cache=cache, activation_checkpointing=distill["activation_checkpointing"],
                                  compile_kl=distill["compile_kl"], teacher_stream=distill["teacher_stream"],
                                  teacher_ahead=distill["teacher_ahead"])
    return objective


def distill_stage2(config: dict, stage_key: str, teacher_dir: Path, data_dir: Path, init_dir: Path,
                   softmax_layers: list[int], out_dir: Path, stop_after_step: int | None = None,
                   score_path: Path | None = None, save_model: bool = True, teacher_cache: Path | None = None,
                   rounds_dir: Path | None = None, job_rounds: bool = False) -> dict:
    """Stage 2 from a stage-1 student with `softmax_layers` restored to the teacher's attention.

    Serves every stage-2 job: all-linear, one-swap rounds (stop_after_step + score_path, no model), greedy
    removal and final hybrids. The score is the held-out KL after the trained steps. `teacher_cache` (written by
    `cache_teacher_hidden`) replaces the teacher's body on the training rows it holds.
    `rounds_dir` scores every round of a one-swap run in this one job (`round{r}.json`, r = 0, 1, ... every
    `scoring.snapshot_every` steps), the scores the live rounds would write, for runs without the early stop:
    it starts from `init_dir` (a kept state would skip rounds whose files a failed attempt lost) and keeps no state.
    `job_rounds` (a live one-swap job, with score_path) scores each round it trains and writes them all into
    score_path (`LiveRounds`), so one job can serve several of the live rule's rounds.
    """
    if job_rounds and score_path is None:
        raise ValueError("job_rounds writes its rounds into score_path; give one")
    if rounds_dir is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("scoring.early_stop.enabled: false scores every round in one job, whose rounds are counted "
                         "in one process's steps; launch score_layer with one process (gpu: 1)")
    teacher, tokenizer = load_teacher(str(teacher_dir))
    student = load_hybrid(init_dir)
    restore_softmax_layers(student, teacher, softmax_layers)
    train_data = open_data(data_dir, "train")
    cache = None if teacher_cache is None else open_teacher_cache(teacher_cache, teacher_dir, teacher, train_data)
    trainable = config["scoring"]["trainable"] if stage_key == "scoring.stage2" else "all"
    objective = stage2_objective(config["distill"], student, teacher, trainable, cache)
    settings = train_settings(stage_section(config, stage_key), config["seed"])
    out_dir = Path(out_dir)
    heldout = open_data(data_dir, "heldout")
    kept_teacher = HeldoutTeacher()  # the teacher's held-out rows, from the first score on

    def score_of(result, with_kl: bool) -> dict:
        tokens_per_step = result.tokens // max(result.step, 1)
        score = {"softmax_layers": softmax_layers_of(result.objective.student), "step": result.step,
                 "tokens": result.tokens, "train_loss": result.loss,
                 "budget_exhausted": result.tokens + tokens_per_step > settings.token_budget}
        if with_kl:
            score["heldout_kl"] = heldout_kl(result.objective.student, result.objective.teacher, heldout,
                                             config["scoring"]["heldout_sequences"], EVAL_BATCH,
                                             config["distill"]["temperature"], config["distill"]["kl_chunk_tokens"],
                                             kept_teacher)
        return score

    scores_rounds = rounds_dir is not None or job_rounds  # only these read the scoring section's round settings
    every = config["scoring"]["snapshot_every"] if scores_rounds else None
    live_rounds = LiveRounds(out_dir, every, config["scoring"]["snapshots_per_job"]) if job_rounds else None

    def write_round(snapshot) -> None:  # round r ends at step min((r + 1) x every, last step)
        score = score_of(snapshot, with_kl=True)
        if rounds_dir is not None:
            write_json(Path(rounds_dir) / f"round{round_of(snapshot.step, every)}.json", score)
        else:
            live_rounds.keep(snapshot.step, score)
    if rounds_dir is not None:
        drop_training_state(out_dir)
    result = train(objective, train_data, settings, out_dir, stop_after_step=stop_after_step,
                   description=f"stage2 {out_dir.parent.name}/{out_dir.name}", snapshot_every=every,
                   on_snapshot=None if rounds_dir is None and live_rounds is None else write_round,
                   cuda_graphs=config["distill"]["cuda_graphs"])
    score = live_rounds.job_score(result.step) if live_rounds else score_of(result, with_kl=score_path is not None)
    if score_path is not None:
        write_json(score_path, score)
    if save_model:
        save_hybrid(result.objective.student.cpu(), out_dir, tokenizer)
    if save_model or rounds_dir is not None:
        drop_training_state(out_dir)
    return score


def round_of(step: int, every: int) -> int:
    """Scoring round r ends at step min((r + 1) x every, last step)."""
    return -(-step // every) - 1


class LiveRounds:
    """The rounds a live one-swap job scores (`scoring.snapshots_per_job` of them), for its one score file.

    Each round's score is also kept beside the layer's training state (`rounds.json`), so a job resumed from a
    state saved mid-job still reports the rounds it scored before it was stopped.
    """

    def __init__(self, out_dir: Path, every: int, per_job: int):
        self.path, self.every, self.per_job = Path(out_dir) / "rounds.json", every, per_job
        kept = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.scores = {int(r): score for r, score in kept.items()}

    def keep(self, step: int, score: dict) -> None:
        self.scores[round_of(step, self.every)] = score
        if int(os.environ.get("RANK", "0")) == 0:  # every process holds the same scores; one writes them
            write_json(self.path, {str(r): score for r, score in sorted(self.scores.items())})

    def job_score(self, step: int) -> dict:
        """The last round's score, with every round of this job in `snapshots` (the decision reads them all)."""
        last = round_of(step, self.every)
        rounds = range(last // self.per_job * self.per_job, last + 1)
        missing = [r for r in rounds if r not in self.scores]
        if missing:
            raise RuntimeError(f"{self.path}: rounds {missing} of this job were never scored (its state outlived "
                               f"their scores); delete {self.path.parent / 'state'} to retrain the layer from step 0")
        return {**self.scores[last], "snapshots": [{**self.scores[r], "round": r} for r in rounds]}


def cache_identity(teacher_dir: Path, teacher, data: PackedTokens) -> dict:
    """What a teacher cache must match: the teacher's files, the training stream and their shapes."""
    return {"teacher_fingerprint": teacher_fingerprint(teacher_dir), "data_sha256": data.meta["sha256"],
            "seq_len": data.seq_len, "hidden_size": teacher.config.hidden_size}


def open_teacher_cache(path: Path, teacher_dir: Path, teacher, data: PackedTokens) -> TeacherCache:
    cache = TeacherCache(path, cache_identity(teacher_dir, teacher, data))
    log.info("teacher cache %s: the teacher's body is skipped on training rows [0, %d)", path, cache.num_sequences)
    return cache


def cache_teacher_hidden(config: dict, teacher_dir: Path, data_dir: Path, out_path: Path) -> dict:
    """Write the teacher cache every stage-2 job of the run reads: the rows they train on, up to
    `distill.teacher_cache.max_gb`, in the device and precision training runs in, batched as distill.stage2 is."""
    on_cpu = train_on_cpu()
    teacher, _ = load_teacher(str(teacher_dir), device="cpu" if on_cpu else "cuda")
    data = open_data(data_dir, "train")
    autocast_dtype = training_autocast_dtype(on_cpu)
    itemsize = (autocast_dtype or next(teacher.parameters()).dtype).itemsize
    sequences_read = max(stage_section(config, key)["tokens"] // data.seq_len
                         for key in ("distill.stage2", "scoring.stage2"))
    row_bytes = data.seq_len * teacher.config.hidden_size * itemsize
    max_gb = config["distill"]["teacher_cache"]["max_gb"]
    count = sequences_to_cache(data.num_sequences, sequences_read, row_bytes, max_gb)
    if count < min(data.num_sequences, sequences_read):
        log.warning("teacher cache: %d of the %d training rows read fit in distill.teacher_cache.max_gb=%s; "
                    "the rest run the live teacher", count, min(data.num_sequences, sequences_read), max_gb)
    return write_teacher_cache(teacher, data, count, config["distill"]["stage2"]["micro_batch_size"], out_path,
                               autocast_dtype=autocast_dtype, identity=cache_identity(teacher_dir, teacher, data))
