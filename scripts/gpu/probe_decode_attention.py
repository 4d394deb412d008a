"""Probe (not a benchmark): kernel breakdown of one eager static decode step, and one-token attention variants."""
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.bench import SMOLLM2_135M
from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder, _grouped_decode_attention
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
teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).cuda().to(torch.bfloat16).eval()
hybrid = build_student(teacher, uniform_layers(30, 8), "gdn").eval()
from hybrid_distill.distill.compiled_blocks import compile_dense_blocks, compile_student
torch._dynamo.config.recompile_limit = 64
compile_dense_blocks(teacher)
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
