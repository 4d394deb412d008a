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


B, H, KV, L, D = 16, 9, 3, 8225, 64
q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, KV, L, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
mask = torch.zeros(1, 1, 1, L, device="cuda")
mask_b = mask.to(torch.bfloat16)
mod = torch.nn.Module()
print("grouped matmul us", timed(lambda: _grouped_decode_attention(mod, q, k, v, mask, scaling=0.125)))
print("sdpa gqa mask bf16 us", timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask_b, enable_gqa=True)))
print("sdpa gqa nomask us", timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
print("sdpa repeated mask us", timed(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask_b)))
g = q.reshape(B, KV, 3, D)
print("bmm1 us", timed(lambda: torch.matmul(g, k.transpose(-1, -2))))
s = torch.randn(B, KV, 3, L, device="cuda", dtype=torch.bfloat16)
print("bmm2 us", timed(lambda: torch.matmul(s, v)))
print("einsum2 us", timed(lambda: torch.einsum("bkgl,bkld->bkgd", s, v)))
print("bmm2 fp32out via mul-sum us", timed(lambda: (s.unsqueeze(-1) * v.unsqueeze(2)).sum(3)))
sys.stdout.flush()

torch.manual_seed(0)
teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).cuda().to(torch.bfloat16).eval()
hybrid = build_student(teacher, uniform_layers(30, 8), "gdn").eval()
prompt = torch.randint(1000, (16, 8192), device="cuda")
for name, model in (("teacher", teacher), ("hybrid", hybrid)):
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, 8, use_graph=False)
    decoder.step(); decoder.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder.step()
        torch.cuda.synchronize()
    print(name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    del decoder
