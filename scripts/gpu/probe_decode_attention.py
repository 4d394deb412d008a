"""Probe (not a benchmark): kernel breakdown of one eager static decode step at 8k x 16 (`3b`: Llama-3.2-3B shapes)."""
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.bench import SMOLLM2_135M
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder
from hybrid_distill.models.student import build_student
from hybrid_distill.select.layer_sets import uniform_layers


def timed(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


torch.manual_seed(0)
LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, vocab_size=128256)
shape = {**SMOLLM2_135M, **(LLAMA_3B if "3b" in sys.argv else {})}
with torch.device("cuda"):
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).eval()
layers = shape["num_hidden_layers"]
hybrid = build_student(teacher, uniform_layers(layers, layers // 4), "gdn").eval()
from hybrid_distill.distill.compiled_blocks import compile_student
torch._dynamo.config.recompile_limit = 64
compile_student(teacher)
compile_student(hybrid)
prompt = torch.randint(1000, (16, 8192), device="cuda")
for name, model in (("teacher", teacher), ("hybrid", hybrid)):
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, 8, use_graph=False)
    decoder.step(); decoder.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder.step()
        torch.cuda.synchronize()
    print(name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    del decoder
