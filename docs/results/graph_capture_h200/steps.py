"""Times each of the first 5 steps of a graphed stage-2 scoring-like step in one process (H200 probe).

The bench's stage-2 "cached" step (teacher hidden states from a cache, fused KL, chunk 2048) for an all-GDN
student with one softmax layer (layer 0) at SmolLM2-135M shapes, 16 x 512 tokens, no compile options, wrapped
in step_graph.GraphedStep(warmup=2) as the trainer's GRAPH_WARMUP_STEPS: steps 1-2 eager (inside
kernels.graphed_steps()), step 3 captures then replays, steps 4-5 replay. As the scoring job does, a held-out
KL evaluation (objectives.heldout_kl, 32 sequences, batch 8, float32, no autocast) runs after steps 2 and 4;
it is timed on its own. Step 3's capture is timed on its own too. A 10 Hz sampler of the main thread's Python
stack says where the slow phases spend their time, and the Triton cache's file count is read before/after each
phase (new files = kernels compiled or autotuned then).

usage: python steps.py TAG OUT.json   (env HD_SHORT_CONV as wanted)
"""
import collections, json, os, sys, threading, time

T0 = time.perf_counter()
import torch

from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill import bench as B
from hybrid_distill.distill.master_weights import adamw_for
from hybrid_distill.distill.objectives import heldout_kl
from hybrid_distill.distill.step_graph import GraphedStep, set_graph_options
from hybrid_distill.models.mixers import kernels

tag, out_path = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
cache_roots = [os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache")),
               os.path.expanduser("~/.tilelang")]  # fla may route some kernels to tilelang (a job log says so)


def triton_files():
    """Files in Triton's cache and tilelang's (compiled kernels, autotune results)."""
    return sum(len(files) for root in cache_roots for _, _, files in os.walk(root))


phase = ["startup"]
samples = collections.defaultdict(collections.Counter)
main_id = threading.get_ident()
stop = threading.Event()


def sampler():
    while not stop.wait(0.1):
        frame = sys._current_frames().get(main_id)
        chain, paths = [], []
        while frame is not None:
            code = frame.f_code
            chain.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
            paths.append(code.co_filename)
            frame = frame.f_back
        names = " ".join(chain)
        kind = ("tilelang" if any("tilelang" in path or "/tvm/" in path for path in paths) else
                "triton-autotune-bench" if ("autotuner.py:_bench" in names or "do_bench" in names) else
                "triton-compile" if ("compiler.py:compile" in names or "build.py:" in names) else
                "cuda-graph-capture-end" if "graphs.py:__exit__" in names else "other")
        samples[phase[0]][kind + " | " + " < ".join(chain[:4])] += 1


def sync():
    if cuda:
        torch.cuda.synchronize()


record = {"tag": tag, "HD_SHORT_CONV": os.environ.get("HD_SHORT_CONV"), "torch": torch.__version__}
try:
    import triton, fla
    record["triton"], record["fla"] = triton.__version__, getattr(fla, "__version__", "?")
except Exception as error:  # noqa: BLE001
    record["versions_error"] = repr(error)
record["import_s"] = time.perf_counter() - T0
threading.Thread(target=sampler, daemon=True).start()

from transformers import LlamaConfig, LlamaForCausalLM
import tempfile
from pathlib import Path

shape = dict(B.SMOLLM2_135M) if cuda else {**B.SMOLLM2_135M, "num_hidden_layers": 2, "hidden_size": 128,
                                             "intermediate_size": 256, "vocab_size": 512, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}
bs, seq = (16, 512) if cuda else (2, 64)
t = time.perf_counter()
torch.manual_seed(0)
teacher = LlamaForCausalLM(LlamaConfig(**shape)).to(device).eval().requires_grad_(False)
batch = torch.randint(0, shape["vocab_size"], (bs, seq), device=device, generator=torch.Generator(device).manual_seed(1))
tmp = tempfile.TemporaryDirectory(prefix="probe_")
cache = B.cache_batch(teacher, batch, Path(tmp.name))
heldout_rows = torch.randint(0, shape["vocab_size"], (32, seq), generator=torch.Generator().manual_seed(2))
write_packed(Path(tmp.name) / "heldout.bin", heldout_rows.numpy(), {"vocab_size": shape["vocab_size"]})
heldout = PackedTokens(Path(tmp.name) / "heldout.bin")
settings = B.BenchSettings(batch_size=bs, seq_len=seq, chunk_tokens=2048, cuda_graph=cuda)
objective = B.build_objective("stage2", "cached", teacher, [0], "gdn", settings, cache).to(device)
params = [p for p in objective.parameters() if p.requires_grad]
optimizer = adamw_for(params, lr=1e-5, fused=cuda)
set_graph_options(optimizer, 1e-5, device if cuda else None)
cached = B.read_cached(objective, bs, 1, device)
sync()
record["setup_s"] = time.perf_counter() - t

step_fn = lambda inputs: B.train_step(objective, inputs[0], optimizer, inputs[1], device,  # noqa: E731
                                      zero_grad=False, autocast_cache=False)
if cuda:
    graphed = GraphedStep(step_fn, optimizer, warmup=2)
    plain_capture = graphed._capture

    def timed_capture(example):
        sync()
        start, files = time.perf_counter(), triton_files()
        phase[0] = "step3-capture"
        result = plain_capture(example)
        sync()
        record["step3_capture_s"] = time.perf_counter() - start
        record["step3_capture_new_triton_files"] = triton_files() - files
        phase[0] = "step3-replay"
        return result

    graphed._capture = timed_capture
    run = lambda: graphed((batch, cached))  # noqa: E731
else:
    run = lambda: (B.train_step(objective, batch, optimizer, cached, device))  # noqa: E731


def timed(name, fn):
    sync()
    phase[0] = name
    files, start = triton_files(), time.perf_counter()
    fn()
    sync()
    record[name + "_s"] = time.perf_counter() - start
    record[name + "_new_triton_files"] = triton_files() - files
    print(f"{tag} {name}: {record[name + '_s']:.3f} s, {record[name + '_new_triton_files']} new triton cache files",
          flush=True)


evaluate = lambda: heldout_kl(objective.student, objective.teacher, heldout, 32, 8, 1.0, 2048)  # noqa: E731
for i in range(1, 6):
    timed(f"step{i}", run)
    if i in (2, 4):
        timed(f"eval_after_step{i}", evaluate)
stop.set()
record["total_s"] = time.perf_counter() - T0
record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
record["samples_top"] = {name: [f"{n:4d} {key}" for key, n in counter.most_common(6)]
                         for name, counter in samples.items() if sum(counter.values()) >= 5}
Path(out_path).write_text(json.dumps(record, indent=1) + "\n")
print(f"{tag} total {record['total_s']:.1f} s", flush=True)
