"""The training runner every distillation job shares: AdamW on an objective's trainable parameters under
Accelerate, a token budget turned into steps, atomic resumable states and a JSONL metrics log."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import SAFE_WEIGHTS_NAME, AutocastKwargs, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hybrid_distill.distill.atomic import publish_dir, write_text_atomic
from hybrid_distill.distill.master_weights import adamw_for
from hybrid_distill.distill.precision import mixed_precision, to_device, train_on_cpu
from hybrid_distill.distill.schedule import lr_multiplier
from hybrid_distill.distill.step_graph import GraphedStep, set_graph_options
from hybrid_distill.distill.teacher_ahead import graphed_step_priority

log = get_logger(__name__)  # logs on the main process only

STATE_RECORD = "trainer_state.json"
STATE_NAME = re.compile(r"^step_(\d{8})$")
STATES_KEPT = 1  # the newest state is published before the older one is removed
FAIL_ENV = "HD_FAIL_AT_STEP"
FAIL_MARKER = ".failed_once"
GRAPH_WARMUP_STEPS = 2  # eager steps before a graphed job captures its step: compiling and autotuning happen there


@dataclass
class TrainSettings:
    token_budget: int  # total tokens the run trains on (steps derived from it)
    micro_batch_size: int  # sequences per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    save_every: int = 50  # steps between saved states
    seed: int = 0
    log_every: int = 1


@dataclass
class TrainResult:
    step: int  # optimizer steps completed, counted over the whole run (earlier rounds included)
    tokens: int  # tokens trained on over the whole run
    loss: float  # loss of the last step (averaged over processes and micro-steps)
    state_dir: Path  # the latest complete state, always inside out_dir/state
    resumed: bool  # True when this call picked up its own out_dir/state (not when it started from init_state)
    objective: torch.nn.Module  # the unwrapped objective, trained weights in place


def train(
    objective: torch.nn.Module,
    data,
    settings: TrainSettings,
    out_dir: Path,
    *,
    clip_groups: list[list[str]] | None = None,
    stop_after_step: int | None = None,
    init_state: Path | None = None,
    first_sequence: int = 0,
    description: str = "train",
    snapshot_every: int | None = None,
    on_snapshot: Callable[[TrainResult], None] | None = None,
    cuda_graphs: bool = False,
) -> TrainResult:
    """Train `objective` (forward(input_ids) -> (loss, metrics)) on `data` (.batch/.seq_len/.num_sequences).

    Resumes from the latest complete state in `out_dir/state`, else starts from `init_state` (another job's
    state: rounds of one run), else fresh; states and data positions then continue from the state, and
    `first_sequence` only places a fresh start. The schedule spans the whole token budget even when
    `stop_after_step` ends this call early. `clip_groups` lists parameter names clipped independently.
    Module modes (train/eval) stay as the caller set them, so a frozen teacher can stay in eval mode.
    An objective with `reads_sequence_indices = True` has `cached_inputs(rows, device)` read what a per-sequence
    cache holds for each micro-batch's data rows before the step (on the host, in the step's autocast context);
    the step passes it to the objective's forward as keyword tensors. An objective with `reads_following_ids = True`
    (stage 2's teacher_ahead) gets each micro-batch's successor as `following_ids` (the last one's: the next
    step's first) and has its `finish_step()` called after each optimizer step.
    `on_snapshot` is called after every `snapshot_every`-th step and after the last, with what this call would
    have returned had it stopped there (one job can then score every round of a run that resumes nothing).
    `cuda_graphs` (`distill.cuda_graphs`) replays each step after the first GRAPH_WARMUP_STEPS as one CUDA graph
    (step_graph.py), computing what the eager steps compute, in one-process CUDA jobs (others train eagerly); a
    step whose micro-batches read a cache and one whose micro-batches run the live teacher are two graphs.
    Setting HD_FAIL_AT_STEP=k raises RuntimeError right after step k (and its state save) once per
    out_dir, marked by `out_dir/.failed_once`, so that workflow tests can check a retried job.
    """
    out_dir = Path(out_dir)
    state_root = out_dir / "state"
    on_cpu = train_on_cpu()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # as evaluate.efficiency_cuda_graphs, where graphs cannot apply the job trains eagerly: on CPUs, and on several
    # processes (DDP's gradient hooks are not captured), so one config serves 1-GPU scoring and 4-GPU final jobs
    graphed = cuda_graphs and not on_cpu and launched == 1
    wants_indices = getattr(objective, "reads_sequence_indices", False)
    wants_following = getattr(objective, "reads_following_ids", False)
    accelerator = Accelerator(
        cpu=on_cpu,  # also makes a multi-process launch on a CPU-only node use gloo
        mixed_precision=mixed_precision(on_cpu),
        step_scheduler_with_optimizer=False,  # else Accelerate steps the schedule once per process
        # a graph must not reuse bf16 weight copies cast before its capture (torch.cuda.graph's autocast note)
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if graphed else None,
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{description}: launched as {launched} processes (WORLD_SIZE) but Accelerate runs "
                           f"{accelerator.num_processes}; each would train alone")
    if cuda_graphs and not on_cpu and launched > 1:
        log.warning("%s: distill.cuda_graphs applies to one-process jobs; these %d processes train eagerly",
                    description, launched)
    set_seed(settings.seed)
    sequences_per_step = settings.micro_batch_size * settings.grad_accum * accelerator.num_processes
    tokens_per_step = sequences_per_step * data.seq_len
    total_steps = _total_steps(settings, tokens_per_step)
    end_step = total_steps if stop_after_step is None else min(stop_after_step, total_steps)
    if stop_after_step is not None and stop_after_step < 1:
        raise ValueError(f"stop_after_step must be at least 1, got {stop_after_step}")
    fail_at = _injected_failure_step()
    if on_snapshot is not None and (snapshot_every is None or snapshot_every < 1):
        raise ValueError(f"{description}: on_snapshot needs snapshot_every >= 1, got {snapshot_every}")

    objective.to(accelerator.device)
    trainable = [(name, param) for name, param in objective.named_parameters() if param.requires_grad]
    if not trainable:
        raise ValueError(f"{description}: the objective has no parameter with requires_grad=True")
    clip_params = _clip_param_groups(trainable, clip_groups)
    optimizer = adamw_for(
        [param for _, param in trainable], lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
        weight_decay=settings.weight_decay, fused=True if accelerator.device.type == "cuda" else None,
    )

    def schedule(step):
        return lr_multiplier(step, total_steps, settings.warmup_steps, settings.schedule, settings.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    _save_only_trainable(accelerator, trainable)

    own_state = _latest_state(state_root)
    source = own_state if own_state is not None else _checked_state(init_state)
    step, tokens, next_sequence, loss = 0, 0, first_sequence, math.nan
    if source is not None:
        accelerator.load_state(str(source))
        record = _read_record(source, total_steps, tokens_per_step)
        step, tokens, next_sequence, loss = record["step"], record["tokens"], record["next_sequence"], record["loss"]
        if own_state is not None:
            log.info("%s: resumed from step %d (%s)", description, step, source)
        else:
            log.info("%s: continuing from step %d of %s", description, step, source)
    set_graph_options(optimizer, settings.lr, accelerator.device if graphed else None)  # after any load
    if first_sequence + total_steps * sequences_per_step > data.num_sequences:
        log.warning("%s: the token budget needs %d sequences but the data holds %d; batches wrap around",
                    description, total_steps * sequences_per_step, data.num_sequences)
    log.info("%s: %d steps of %d tokens (%d to go in this job)", description, total_steps, tokens_per_step,
             max(0, end_step - step))

    metrics_path = out_dir / "metrics.jsonl"
    latest_state = own_state
    with ExitStack() as cleanup:
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            _drop_metrics_after(metrics_path, step)
            metrics_file = cleanup.enter_context(open(metrics_path, "a"))
        progress = cleanup.enter_context(tqdm(
            total=end_step, initial=step, desc=description, unit="step", dynamic_ncols=True,
            disable=None if accelerator.is_main_process else True))
        tokens_since_report, report_start = 0, time.perf_counter()
        first_rank_sequence = accelerator.process_index * settings.micro_batch_size * settings.grad_accum

        def optimizer_step(inputs):
            micro_batches, cached, following = inputs
            loss_sum, metric_sums = _accumulate_gradients(accelerator, model, micro_batches, cached,
                                                          settings.grad_accum, following)
            grad_norm = _clip(clip_params, settings.max_grad_norm)
            optimizer.step()
            if wants_following:
                objective.finish_step()
            return loss_sum, metric_sums, grad_norm

        graphed_step = GraphedStep(optimizer_step, optimizer, GRAPH_WARMUP_STEPS,
                                   stream_priority=graphed_step_priority(objective)) if graphed else None
        while step < end_step:
            lr = settings.lr * schedule(step)
            micro_batches, rows = _step_batches(data, next_sequence + first_rank_sequence, settings, wants_indices)
            # the next step's first micro-batch, for a teacher running one micro-batch ahead (past the last step too)
            following = to_device(data.batch(next_sequence + sequences_per_step + first_rank_sequence,
                                             settings.micro_batch_size), accelerator.device) if wants_following else ()
            micro_batches = to_device(micro_batches, accelerator.device)
            cached = _cached_inputs(objective, rows, accelerator, settings.grad_accum)
            if graphed_step is not None:  # one graph per pattern of cached and live micro-batches
                loss_sum, metric_sums, grad_norm = graphed_step((micro_batches, cached, following))
            else:
                loss_sum, metric_sums, grad_norm = optimizer_step((micro_batches, cached, following))
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens += tokens_per_step
            next_sequence += sequences_per_step
            tokens_since_report += tokens_per_step
            progress.update(1)

            saving = step % settings.save_every == 0 or step == end_step
            gathered = saving or step % settings.log_every == 0
            if gathered:
                loss, objective_metrics = _mean_over_processes(accelerator, loss_sum, metric_sums, settings.grad_accum)
                now = time.perf_counter()
                line = {**objective_metrics, "step": step, "tokens": tokens, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm.item(), "tokens_per_s": tokens_since_report / (now - report_start)}
                tokens_since_report, report_start = 0, now
                if accelerator.is_main_process:
                    metrics_file.write(json.dumps(line) + "\n")
                    metrics_file.flush()
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if saving:
                record = dict(step=step, tokens=tokens, next_sequence=next_sequence, loss=loss,
                              total_steps=total_steps, tokens_per_step=tokens_per_step,
                              num_processes=accelerator.num_processes, description=description,
                              settings=asdict(settings))
                latest_state = _save_state(accelerator, state_root, record)
            if on_snapshot is not None and (step % snapshot_every == 0 or step == end_step):
                if not gathered:
                    loss, _ = _mean_over_processes(accelerator, loss_sum, metric_sums, settings.grad_accum)
                on_snapshot(TrainResult(step=step, tokens=tokens, loss=loss, state_dir=latest_state,
                                        resumed=own_state is not None, objective=accelerator.unwrap_model(model)))
            if step == fail_at:
                _fail_once(accelerator, out_dir, step)

    if latest_state is None or _state_step(latest_state) != step:  # started from init_state, nothing to train
        record = json.loads((source / STATE_RECORD).read_text())
        latest_state = _save_state(accelerator, state_root, record)
    accelerator.wait_for_everyone()
    return TrainResult(step=step, tokens=tokens, loss=loss, state_dir=latest_state, resumed=own_state is not None,
                       objective=accelerator.unwrap_model(model, keep_fp32_wrapper=False))


def _total_steps(settings: TrainSettings, tokens_per_step: int) -> int:
    for key in ("micro_batch_size", "grad_accum", "save_every", "log_every"):
        if getattr(settings, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(settings, key)}")
    total_steps = settings.token_budget // tokens_per_step
    if total_steps < 1:
        raise ValueError(f"token_budget={settings.token_budget} is less than one step of {tokens_per_step} tokens "
                         "(micro_batch_size x grad_accum x processes x seq_len)")
    lr_multiplier(0, total_steps, settings.warmup_steps, settings.schedule, settings.min_lr_ratio)  # validates
    return total_steps


def _injected_failure_step() -> int | None:
    value = os.environ.get(FAIL_ENV, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{FAIL_ENV} must be a step number, got {value!r}") from None


def _fail_once(accelerator: Accelerator, out_dir: Path, step: int) -> None:
    marker = out_dir / FAIL_MARKER
    first_time = not marker.exists()
    accelerator.wait_for_everyone()  # every process looks before the main one creates the marker
    if first_time:
        if accelerator.is_main_process:
            marker.touch()
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ENV})")


def _clip_param_groups(trainable, clip_groups: list[list[str]] | None) -> list[list[torch.nn.Parameter]]:
    if clip_groups is None:
        return [[param for _, param in trainable]]
    by_name = dict(trainable)
    seen: set[str] = set()
    for group in clip_groups:
        if not group:
            raise ValueError("clip_groups holds an empty group")
        for name in group:
            if name not in by_name:
                raise ValueError(f"clip_groups names {name!r}, which is not a trainable parameter of the objective")
            if name in seen:
                raise ValueError(f"clip_groups names {name!r} in more than one place")
            seen.add(name)
    unclipped = [name for name in by_name if name not in seen]
    if unclipped:
        raise ValueError(f"clip_groups leaves {len(unclipped)} trainable parameters out, e.g. {unclipped[:3]}")
    return [[by_name[name] for name in group] for group in clip_groups]


def _clip(clip_params: list[list[torch.nn.Parameter]], max_grad_norm: float | None) -> torch.Tensor:
    """Clip each group to `max_grad_norm` on its own and return the norm of all gradients before clipping."""
    max_norm = math.inf if max_grad_norm is None else max_grad_norm
    group_norms = [torch.nn.utils.clip_grad_norm_(params, max_norm) for params in clip_params]
    return torch.linalg.vector_norm(torch.stack(group_norms))


def _step_batches(data, first_sequence: int, settings: TrainSettings, wants_indices: bool):
    """This process's micro-batches of one step as one [grad_accum, micro_batch_size, seq_len] tensor, and their
    data rows per micro-batch when the objective reads them (else None)."""
    firsts = [first_sequence + micro_step * settings.micro_batch_size for micro_step in range(settings.grad_accum)]
    micro_batches = torch.stack([data.batch(first, settings.micro_batch_size) for first in firsts])
    rows = [batch_rows(first, settings.micro_batch_size, data.num_sequences) for first in firsts] \
        if wants_indices else None
    return micro_batches, rows


def _cached_inputs(objective, rows, accelerator: Accelerator, grad_accum: int) -> list[dict]:
    """Per micro-batch, the keyword tensors the objective's cache holds for its data rows (empty where it holds
    none, or the objective reads no rows), read here on the host in the step's autocast context."""
    if rows is None:
        return [{} for _ in range(grad_accum)]
    with accelerator.autocast():
        return [objective.cached_inputs(micro_rows, accelerator.device) for micro_rows in rows]


def _accumulate_gradients(accelerator: Accelerator, model, micro_batches: torch.Tensor, cached: list[dict],
                          grad_accum: int, following):
    """Backpropagate this process's share of one step, micro-batch by micro-batch; DDP syncs on the last.
    `cached` holds each micro-batch's keyword tensors from the objective's cache (see `_cached_inputs`);
    `following` is the next step's first micro-batch for an objective that reads following_ids, else ()."""
    loss_sum = torch.zeros((), device=accelerator.device)
    metric_sums: dict[str, torch.Tensor | float] = {}
    for micro_step in range(grad_accum):
        last = micro_step == grad_accum - 1
        extra = dict(cached[micro_step])
        if isinstance(following, torch.Tensor):
            extra["following_ids"] = following if last else micro_batches[micro_step + 1]
        with nullcontext() if last else accelerator.no_sync(model):
            loss, metrics = model(micro_batches[micro_step], **extra)
            accelerator.backward(loss / grad_accum)
        loss_sum += loss.detach().float()
        for key, value in metrics.items():  # device tensors stay there: no host sync per step
            metric_sums[key] = metric_sums.get(key, 0.0) + (
                value.detach().float() if torch.is_tensor(value) else float(value))
    return loss_sum, metric_sums


def batch_rows(first_sequence: int, batch_size: int, num_sequences: int) -> list[int]:
    """The data rows `data.batch(first_sequence, batch_size)` returns, wrapping around as it does."""
    return [(first_sequence + offset) % num_sequences for offset in range(batch_size)]


def _mean_over_processes(accelerator, loss_sum: torch.Tensor, metric_sums: dict, grad_accum: int):
    keys = sorted(metric_sums)
    values = torch.stack([loss_sum, *(torch.as_tensor(metric_sums[k], dtype=loss_sum.dtype, device=loss_sum.device)
                                      for k in keys)])
    values = accelerator.reduce(values / grad_accum, reduction="mean").tolist()
    return values[0], dict(zip(keys, values[1:]))


def _save_only_trainable(accelerator: Accelerator, trainable) -> None:
    """Make states hold the trainable parameters only (a frozen teacher would dominate them), keyed by name."""
    names = {name for name, _ in trainable}

    def save_hook(models, weights, output_dir):
        weights[:] = [OrderedDict((name, param.detach()) for name, param in trainable)]

    def load_hook(models, input_dir):
        models.clear()  # loaded here instead of by Accelerate
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        tensors = load_file(path)
        if tensors.keys() != names:
            raise ValueError(f"{path} does not hold the objective's trainable parameters: missing "
                             f"{sorted(names - tensors.keys())[:3]}, unexpected {sorted(tensors.keys() - names)[:3]}")
        with torch.no_grad():
            for name, param in trainable:
                param.copy_(tensors[name])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _state_step(state_dir: Path) -> int:
    return int(STATE_NAME.match(state_dir.name).group(1))


def _complete_states(state_root: Path) -> list[Path]:
    """State dirs in step order; a dir only gets its final name once complete, so staging dirs never count."""
    if not state_root.is_dir():
        return []
    states = [path for path in state_root.iterdir()
              if STATE_NAME.match(path.name) and (path / STATE_RECORD).is_file()]
    return sorted(states, key=_state_step)


def _latest_state(state_root: Path) -> Path | None:
    states = _complete_states(state_root)
    return states[-1] if states else None


def _checked_state(init_state: Path | None) -> Path | None:
    if init_state is None:
        return None
    init_state = Path(init_state)
    if not STATE_NAME.match(init_state.name) or not (init_state / STATE_RECORD).is_file():
        raise ValueError(f"init_state {init_state} is not a complete state dir (step_NNNNNNNN with {STATE_RECORD})")
    return init_state


def _read_record(state_dir: Path, total_steps: int, tokens_per_step: int) -> dict:
    record = json.loads((state_dir / STATE_RECORD).read_text())
    if (record["total_steps"], record["tokens_per_step"]) != (total_steps, tokens_per_step):
        raise ValueError(
            f"state {state_dir} belongs to a run of {record['total_steps']} steps of {record['tokens_per_step']} "
            f"tokens, this one has {total_steps} of {tokens_per_step}: token_budget, micro_batch_size, grad_accum "
            "or the number of processes changed")
    return record


def _save_state(accelerator: Accelerator, state_root: Path, record: dict) -> Path:
    """Write the state into a staging dir, the record last, and rename it into place; keep only the latest."""
    final = state_root / f"step_{record['step']:08d}"
    staging = state_root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(staging / STATE_RECORD, json.dumps(record, indent=1) + "\n")
        publish_dir(staging, final)
        _prune_states(state_root)
    accelerator.wait_for_everyone()
    return final


def _prune_states(state_root: Path) -> None:
    for old in _complete_states(state_root)[:-STATES_KEPT]:
        retired = old.with_name(f".{old.name}.retired")
        os.replace(old, retired)  # renamed first so that a kill mid-delete leaves no half state under a step name
        shutil.rmtree(retired)
    for leftover in state_root.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _drop_metrics_after(metrics_path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (those the resumed state already trained), and no cut-off line."""
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomic(metrics_path, "".join(kept))
