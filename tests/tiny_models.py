"""Tiny random Llama/Qwen2 teachers for exact CPU tests (importable from any test folder)."""
from __future__ import annotations

import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_config(family: str = "llama", **overrides):
    """A 4-layer GQA config small enough for exact CPU tests; `family` picks Llama or Qwen2 (q/k/v biases)."""
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields) if family == "llama" else Qwen2Config(**fields)


def tiny_teacher(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in fp32 and eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    if family == "qwen2":  # random biases so that bias transfer is actually exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.eval()
