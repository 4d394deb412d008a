"""Side-by-side timing of distillation steps: the naive step (full-vocab logits) against the project's step,
and the project's stage-2 step with the live teacher against one reading a teacher cache ("cached").

Numbers come only from this benchmark (never from tests): median tokens/s after warm-up, model-FLOPs
utilisation against a measured bf16 matmul rate, and peak memory.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_distill.config.load import validate_config
from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill.attention_backend import sdpa_choice
from hybrid_distill.distill.bench_processes import bench_processes, data_parallel, unwrapped
from hybrid_distill.distill.fused_kl import kl_heads_choice, kl_rows_choice, naive_kl
from hybrid_distill.distill.gemm_ceiling import linear_gemms, time_gemms
from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.kernel_groups import group_times, kernel_times
from hybrid_distill.distill.master_weights import adamw_for
from hybrid_distill.distill.merged_projections import merged_projections_choice
from hybrid_distill.distill.objectives import HiddenAlignment, LogitDistillation
from hybrid_distill.distill.precision import training_autocast_dtype
from hybrid_distill.distill.step_graph import GraphedStep, set_graph_options
from hybrid_distill.distill.teacher_ahead import PRIORITY_SWITCH, graphed_step_priority
from hybrid_distill.distill.teacher_cache import TeacherCache, write_teacher_cache
from hybrid_distill.models.mixers import kernels as mixer_ops
from hybrid_distill.models.mixers.base import LinearMixer
from hybrid_distill.models.student import build_student, decoder_layers

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)


@dataclass
class BenchRow:
    stage: str
    student: str
    step: str
    tokens_per_s: float | None
    mfu: float | None
    peak_mem_gb: float | None
    note: str = ""
    top_kernels: list | None = None
    gemm_ms: float | None = None  # the step's weight GEMMs alone (gemm_ceiling.py)
    mfu_ceiling: float | None = None  # the MFU if nothing but those GEMMs took time
    mfu_with_attention: float | None = None  # stage 2: the MFU counting the softmax attention's matmuls too
    kernel_groups: list | None = None  # the profiled step's device time by kind of kernel (kernel_groups.py)
    issue_ms: float | None = None  # median ms the host took to issue a step (before waiting for the device)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(device, dtype=torch.bfloat16, size=8192, repeats=20) -> float:
    """Measured dense matmul FLOP/s: the ceiling MFU is computed against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


class NaiveLogitDistillation(LogitDistillation):
    """Stage 2 as a first implementation would write it: both [tokens x vocab] logits in memory."""

    reads_sequence_indices = False

    def forward(self, input_ids):
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        return naive_kl(student_logits.flatten(0, 1), teacher_logits.flatten(0, 1), self.temperature), {}


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run times: token shapes, rows, and the stage-2 options of the project's steps."""
    batch_size: int = 8
    seq_len: int = 2048
    warmup: int = 2
    repeats: int = 5
    stages: tuple = ("stage1", "stage2")
    students: tuple = ("softmax", "gdn", "gla")
    chunk_tokens: int = 4096
    shape: dict | None = None
    stage2_steps: tuple = ("naive", "project", "cached")
    activation_checkpointing: bool = False
    compile_blocks: bool = False
    profile_top: int = 0
    bf16_weights: bool = False
    gemm_ceiling: bool = False
    compile_kl: bool = False
    cuda_graph: bool = False
    micro_batches: int = 1
    activation_memory_budget: float = 1.0
    activation_memory_budget_layers: int | None = None  # null: the budget applies everywhere
    teacher_stream: bool = True  # distill.teacher_stream's default
    teacher_ahead: bool = True  # distill.teacher_ahead's default

    def __post_init__(self):
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} must be at least 1 and divide "
                             f"batch_size={self.batch_size}")


def build_objective(stage, step, teacher, softmax_layers, mixer, settings: BenchSettings, teacher_cache=None):
    """The objective one row times; the options apply to the project's steps, never to the naive baseline."""
    student = build_student(teacher, softmax_layers, mixer)
    if stage == "stage1":
        objective = HiddenAlignment(student, teacher)
    elif step == "naive":
        return NaiveLogitDistillation(student, teacher, 1.0, settings.chunk_tokens)
    else:  # the workflow's own stage-2 construction, so the bench times what the jobs run
        distill = {**validate_config({})["distill"], "temperature": 1.0, "kl_chunk_tokens": settings.chunk_tokens,
                   "activation_checkpointing": settings.activation_checkpointing,
                   "compile_blocks": settings.compile_blocks, "bf16_weights": settings.bf16_weights,
                   "compile_kl": settings.compile_kl,  # the schema's defaults for any option the bench does not set
                   "activation_memory_budget": settings.activation_memory_budget,
                   "activation_memory_budget_layers": settings.activation_memory_budget_layers,
                   "teacher_stream": settings.teacher_stream, "teacher_ahead": settings.teacher_ahead}
        # compile_blocks compiles the teacher in place: a copy keeps the rows after this one (naive ones) eager
        row_teacher = copy.deepcopy(teacher) if settings.compile_blocks else teacher
        objective = stage2_objective(distill, student, row_teacher, "all",
                                     teacher_cache if step == "cached" else None)
    return objective


def cache_batch(teacher, batch, directory: Path) -> TeacherCache:
    """The benchmark batch's teacher cache, written and read as a run's would be (same autocast as the steps)."""
    write_packed(directory / "train.bin", batch.cpu().numpy(), {"vocab_size": teacher.config.vocab_size})
    data = PackedTokens(directory / "train.bin")
    identity = {"teacher_fingerprint": "bench", "data_sha256": data.meta["sha256"], "seq_len": data.seq_len,
                "hidden_size": teacher.config.hidden_size}
    autocast_dtype = training_autocast_dtype(on_cpu=batch.device.type != "cuda")
    write_teacher_cache(teacher, data, data.num_sequences, data.num_sequences, directory / "hidden.bin",
                        autocast_dtype=autocast_dtype, identity=identity)
    return TeacherCache(directory / "hidden.bin", identity)


def _inductor_tuning() -> dict:
    """Inductor's GEMM autotuning (TORCHINDUCTOR_MAX_AUTOTUNE=1, bench_step_profile.sh max_autotune) and its kernels'
    coordinate-descent tuning (compiled_blocks.tune_generated_kernels), each when on, so that compare_benches names
    them; absent otherwise, as in results written before they were recorded."""
    import torch._inductor.config as inductor_config

    return {name: True for name, on in (("inductor_max_autotune", inductor_config.max_autotune),
                                         ("inductor_coordinate_descent", inductor_config.coordinate_descent_tuning))
            if on}


def model_flops_per_token(objective) -> float:
    """6 N for the trained student (forward + backward) + 2 N for the teacher's forward, N = matmul weights;
    a cached teacher only runs its lm_head."""
    student_params = sum(p.numel() for p in objective.student.parameters())
    teacher_params = sum(p.numel() for p in objective.teacher.parameters())
    if getattr(objective, "teacher_cache", None) is not None:
        teacher_params = objective.teacher.lm_head.weight.numel()
    trainable = sum(p.numel() for p in objective.student.parameters() if p.requires_grad)
    return 2 * (student_params + teacher_params) + 4 * trainable


def reference_matmul_rate(device) -> float | None:
    """The bf16 matmul FLOP/s that MFU is measured against: this GPU's own, measured; none on a CPU."""
    return matmul_rate(device) if device.type == "cuda" else None


def attention_flops_per_token(objective, seq_len: int) -> float:
    """The softmax attention's own matmuls (QK^T and PV) per token, which model_flops_per_token leaves out: as a
    causal kernel does them, (seq_len + 1) / 2 keys per query on average, 4 x heads x head_dim FLOPs per key and
    layer; 3x that for the trained student's softmax layers (forward and backward), 1x for the live teacher's. Added
    to 8N it gives the usual "MFU with attention" (PaLM's appendix B counts the full seq_len instead of the causal
    half, about twice this). Linear mixers' own maths is not counted."""
    def per_layer(model) -> float:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 4 * config.num_attention_heads * head_dim * (seq_len + 1) / 2

    def softmax_layers(model) -> int:
        return sum(not isinstance(layer.self_attn, LinearMixer) for layer in decoder_layers(model))

    student, teacher = objective.student, objective.teacher
    flops = 3 * per_layer(student) * softmax_layers(student)
    if getattr(objective, "teacher_cache", None) is None:
        flops += per_layer(teacher) * softmax_layers(teacher)
    return flops


def train_step(objective, batch, optimizer, cached, device, zero_grad=True, autocast_cache=True, micro_batches=1):
    """One optimizer step in the trainer's numeric context (bf16 autocast on GPUs, none on CPU); returns the loss.
    `micro_batches` > 1 splits the batch into that many equal parts and accumulates their gradients before the one
    optimizer step (the trainer's grad_accum): activations of one part at a time, the same step. `cached` holds
    each part's keyword tensors from the objective's teacher cache (`cached_inputs`), or is empty."""
    autocast_dtype = training_autocast_dtype(on_cpu=device.type != "cuda")
    total = torch.zeros((), device=batch.device)
    parts = batch.chunk(micro_batches)
    ahead = getattr(unwrapped(objective), "reads_following_ids", False)
    for part, chunk in enumerate(parts):
        extra = dict(cached[part]) if cached else {}
        if ahead:  # the bench's next step trains on the same batch: the last part's successor is the first
            extra["following_ids"] = parts[(part + 1) % len(parts)]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                            cache_enabled=autocast_cache):
            loss, _ = objective(chunk, **extra)
        (loss / micro_batches).backward()
        total += loss.detach().float()
    optimizer.step()
    if ahead:
        unwrapped(objective).finish_step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return total / micro_batches


def read_cached(objective, batch_size: int, micro_batches: int, device) -> list[dict]:
    """Each part's cached teacher rows (the bench's batch is the cache's rows 0..batch_size-1), read on the host
    before the steps as the trainer reads them; empty without a cache."""
    objective = unwrapped(objective)
    if getattr(objective, "teacher_cache", None) is None:
        return []
    size = batch_size // micro_batches
    autocast_dtype = training_autocast_dtype(on_cpu=device.type != "cuda")
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return [objective.cached_inputs(list(range(part * size, (part + 1) * size)), device)
                for part in range(micro_batches)]


def time_steps(objective, batch, warmup, repeats, device, profile_top=0, cuda_graph=False, micro_batches=1):
    """(seconds per step after `warmup` steps, seconds the host took to issue each of those steps) and, with
    profile_top > 0, (the kernels that took the most device time in one more step: name, ms, share of the step's
    device time, calls; all its time by kind of kernel). An issue time close to the step's means the device
    waited on the host. `cuda_graph` replays the whole step as one CUDA graph (step_graph.py), captured after
    the warm-up steps (with lr as a tensor, as the trainer's graphed steps have it), all its micro-batches and any
    cached teacher rows in the one graph."""
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = adamw_for(params, lr=1e-5, fused=device.type == "cuda")  # the trainer's optimizer
    set_graph_options(optimizer, 1e-5, device if cuda_graph else None)
    cached = read_cached(objective, len(batch), micro_batches, device)
    if cuda_graph:
        graphed = GraphedStep(lambda inputs: train_step(objective, inputs[0], optimizer, inputs[1], device,
                                                        zero_grad=False, autocast_cache=False,
                                                        micro_batches=micro_batches), optimizer, warmup,
                               stream_priority=graphed_step_priority(unwrapped(objective)))
        step = lambda: graphed((batch, cached))  # noqa: E731
        warmup += 1  # the capture: the call after the warm-up steps records the graph before its first replay
    else:
        step = lambda: train_step(objective, batch, optimizer, cached, device,  # noqa: E731
                                  micro_batches=micro_batches)
    times, issue_times = [], []
    for i in range(warmup + repeats):
        synchronize()
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            issue_times.append(issued - start)
    if not profile_top:
        return times, issue_times, (None, None)
    return times, issue_times, profile_kernels(step, device, profile_top)


def profile_kernels(step, device, top: int) -> tuple[list[dict], list[dict]]:
    times = kernel_times(step, device)
    total = sum(ms for ms, _ in times.values()) or 1.0
    ranked = sorted(times, key=lambda name: times[name][0], reverse=True)[:top]
    kernels = [{"name": name[:90], "ms": times[name][0], "share": times[name][0] / total, "calls": times[name][1]}
               for name in ranked]
    return kernels, group_times({name: ms for name, (ms, _) in times.items()})


def _gemm_ceiling(objective, tokens, step, device, peak_rate) -> tuple[float, float | None]:
    """(ms of the step's weight GEMMs alone, the MFU if they were all the step did)."""
    gemms = linear_gemms(objective.student, objective.teacher, tokens, teacher_body=step != "cached")
    seconds = time_gemms(gemms, device)
    ceiling = model_flops_per_token(objective) * tokens / seconds / peak_rate if peak_rate else None
    return seconds * 1e3, ceiling


def run_benchmark(**settings) -> dict:
    """The table's rows for `BenchSettings(**settings)`; every process of a multi-process launch returns them
    (rank 0 is the one to print). Each process steps on batch_size x seq_len tokens, so tokens/s counts all
    processes' tokens."""
    settings = BenchSettings(**settings)
    with bench_processes() as (rank, world, device):
        if settings.cuda_graph and world > 1:
            raise ValueError("bench --cuda-graph times one process: DDP's gradient hooks are not captured here")
        result = _run_rows(settings, rank, world, device)
    return {**result, "rank": rank}


def _run_rows(settings: BenchSettings, rank, world, device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same teacher and students in every process, as DDP requires
    shape = {**SMOLLM2_135M, **(settings.shape or {})}
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).to(device).eval()
    teacher.requires_grad_(False)
    layers = teacher.config.num_hidden_layers
    peak_rate = reference_matmul_rate(device)
    batch = torch.randint(0, teacher.config.vocab_size, (settings.batch_size, settings.seq_len), device=device,
                          generator=torch.Generator(device).manual_seed(1 + rank))  # each process its own rows
    cache_dir = tempfile.TemporaryDirectory(prefix="bench_teacher_cache_")
    teacher_cache = cache_batch(teacher, batch, Path(cache_dir.name)) if "cached" in settings.stage2_steps else None
    rows = []
    for stage in settings.stages:
        for student_kind in settings.students:
            if stage == "stage1" and student_kind == "softmax":
                continue  # nothing to align
            softmax_layers = range(layers) if student_kind == "softmax" else []
            mixer = "gdn" if student_kind == "softmax" else student_kind
            for step in (settings.stage2_steps if stage == "stage2" else ("project",)):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                if settings.compile_blocks or settings.compile_kl:
                    # each row compiles from a clean slate, as a job does: on an H200 an all-GDN row timed after an
                    # all-softmax row in one process ran at 113k tok/s, and alone at 160k (docs/performance.md)
                    torch._dynamo.reset()
                try:
                    torch.manual_seed(0)  # fresh mixer parameters equal across processes
                    objective = build_objective(stage, step, teacher, softmax_layers, mixer, settings,
                                                teacher_cache).to(device)
                    objective = data_parallel(objective, device, world)
                    times, issue_times, (kernels, groups) = time_steps(
                        objective, batch, settings.warmup, settings.repeats, device, settings.profile_top,
                        settings.cuda_graph and step != "naive", settings.micro_batches)
                except torch.OutOfMemoryError:
                    rows.append(BenchRow(stage, student_kind, step, None, None, None, "out of memory"))
                    continue
                finally:
                    objective = locals().get("objective")
                tokens_per_s = world * batch.numel() / statistics.median(times)
                mfu = model_flops_per_token(unwrapped(objective)) * tokens_per_s / (peak_rate * world) \
                    if peak_rate else None
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
                row = BenchRow(stage, student_kind, step, tokens_per_s, mfu, peak,
                               "teacher hidden states read from a cache" if step == "cached" else "", kernels,
                               kernel_groups=groups, issue_ms=statistics.median(issue_times) * 1e3)
                if mfu is not None and stage == "stage2":
                    row.mfu_with_attention = mfu + attention_flops_per_token(
                        unwrapped(objective), settings.seq_len) * tokens_per_s / (peak_rate * world)
                if settings.gemm_ceiling and stage == "stage2":
                    row.gemm_ms, row.mfu_ceiling = _gemm_ceiling(unwrapped(objective), batch.numel(), step, device,
                                                                 peak_rate)
                rows.append(row)
                del objective
    cache_dir.cleanup()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "processes": world, "batch_size": settings.batch_size, "seq_len": settings.seq_len,
            "tokens_per_step": world * batch.numel(), "matmul_bf16_flops": peak_rate,
            "shape": shape,
            "options": {"kl_chunk_tokens": settings.chunk_tokens,
                        "activation_checkpointing": settings.activation_checkpointing,
                        "compile_blocks": settings.compile_blocks, "bf16_weights": settings.bf16_weights,
                        "compile_kl": settings.compile_kl, "cuda_graph": settings.cuda_graph,
                        "micro_batches": settings.micro_batches,
                        "activation_memory_budget": settings.activation_memory_budget,
                        "activation_memory_budget_layers": settings.activation_memory_budget_layers,
                        "teacher_stream": settings.teacher_stream,
                        "teacher_ahead": settings.teacher_ahead,
                        **({"teacher_ahead_priority": os.environ.get(PRIORITY_SWITCH, "low")}
                           if settings.teacher_ahead else {}),
                        "kl_rows": kl_rows_choice() if settings.compile_kl else None,
                        "kl_heads": kl_heads_choice(),
                        "merged_projections": merged_projections_choice() if settings.compile_blocks else None,
                        "sdpa": sdpa_choice(),
                        **{name.lower(): os.environ[name] for name in mixer_ops.MIXER_OP_SWITCHES
                           if name in os.environ},
                        "short_conv": mixer_ops.op_choice("HD_SHORT_CONV", settings.cuda_graph)  # the project step's
                        if device.type == "cuda" else "torch",
                        **_inductor_tuning(),
                        "flash_qla": _installed_version("flash_qla"),  # fla's GDN backend, where it applies
                        "torch": torch.__version__},
            "compiled_graphs": compiled_graph_counts(),
            "rows": [row.__dict__ for row in rows]}


def compiled_graph_counts() -> dict[str, int]:
    """How many compiled graphs this process loaded from the kernel cache (hybrid_distill/kernel_cache.py) and how
    many it had to compile: Inductor's FX graph cache and AOTAutograd's cache, hits and misses."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": count for group in ("inductor", "aot_autograd")
            for name, count in sorted(counters[group].items()) if "cache" in name}


def format_table(result: dict) -> str:
    where = (f"device {result['device']} x {result.get('processes', 1)} processes, batch {result['batch_size']} x "
             f"{result['seq_len']} tokens per process")
    lines = [f"{where}, bf16 matmul {result['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s per device"
             if result["matmul_bf16_flops"] else where,
             "options: " + ", ".join(f"{key} {value}" for key, value in result.get("options", {}).items()),
             f"{'stage':7} {'student':8} {'step':8} {'tok/s':>10} {'MFU':>6} {'peak GB':>8} {'step ms':>8} "
             f"{'issue ms':>8} {'GEMM ms':>8} {'ceiling':>7} {'MFU+attn':>8}  note"]
    for row in result["rows"]:
        tps = f"{row['tokens_per_s']:10.0f}" if row["tokens_per_s"] else f"{'-':>10}"
        mfu = f"{row['mfu'] * 100:5.1f}%" if row["mfu"] else f"{'-':>6}"
        peak = f"{row['peak_mem_gb']:8.1f}" if row["peak_mem_gb"] else f"{'-':>8}"
        step_ms = f"{_step_ms(result, row):8.1f}" if row["tokens_per_s"] else f"{'-':>8}"
        issue_ms = f"{row['issue_ms']:8.1f}" if row.get("issue_ms") is not None else f"{'-':>8}"
        gemm_ms = f"{row['gemm_ms']:8.1f}" if row.get("gemm_ms") else f"{'-':>8}"
        ceiling = f"{row['mfu_ceiling'] * 100:6.1f}%" if row.get("mfu_ceiling") else f"{'-':>7}"
        with_attention = f"{row['mfu_with_attention'] * 100:7.1f}%" if row.get("mfu_with_attention") else f"{'-':>8}"
        lines.append(f"{row['stage']:7} {row['student']:8} {row['step']:8} {tps} {mfu} {peak} {step_ms} {issue_ms} "
                     f"{gemm_ms} {ceiling} {with_attention}  {row['note']}")
    for row in result["rows"]:
        if row.get("top_kernels"):
            lines.append(f"-- top kernels, one {row['stage']} step of {row['student']} / {row['step']}:")
            lines += [f"   {kernel['ms']:8.2f} ms {kernel['share'] * 100:5.1f}% x{kernel['calls']:<5} {kernel['name']}"
                      for kernel in row["top_kernels"]]
        if row.get("kernel_groups"):  # kernels well short of the step: the device waited on the host
            kernel_ms = sum(group["ms"] for group in row["kernel_groups"])
            lines.append(f"-- device time by kind of kernel, the same step: {kernel_ms:.1f} ms in kernels against a "
                         f"median step of {_step_ms(result, row):.1f} ms:")
            lines += [f"   {group['ms']:8.2f} ms {group['share'] * 100:5.1f}% {group['kernels']:5} kernels  "
                      f"{group['group']}" for group in row["kernel_groups"]]
    return "\n".join(lines)


def _installed_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _step_ms(result: dict, row: dict) -> float:
    """A row's median step in ms, from its tokens/s and the tokens of one step."""
    return result["tokens_per_step"] / row["tokens_per_s"] * 1e3


def write_result(result: dict, path) -> None:
    from hybrid_distill.distill.atomic import write_text_atomic
    from pathlib import Path

    write_text_atomic(Path(path), json.dumps(result, indent=2) + "\n")
