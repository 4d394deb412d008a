"""Bypass heuristics: remove one layer's mixing sublayer (identity residual) and measure what the teacher loses."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from hybrid_distill.models.student import decoder_layers


@contextmanager
def bypassed(model, layer: int):
    """Within the block, layer `layer`'s attention returns zeros, so U = X (the residual passes straight on)."""
    attention = decoder_layers(model)[layer].self_attn
    original = attention.forward

    def zero_mixer(hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None

    attention.forward = zero_mixer
    try:
        yield model
    finally:
        attention.forward = original


@torch.no_grad()
def final_hidden_and_nll(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Final hidden states and the token-mean next-token NLL on `input_ids`."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return hidden, nll.item()


@torch.no_grad()
def act_mse_and_ppl_increase(model, input_ids: torch.Tensor) -> tuple[dict[int, float], dict[int, float]]:
    """ACT-MSE (final-hidden MSE) and LM-PPL (perplexity increase) of bypassing each layer alone."""
    input_ids = input_ids.to(next(model.parameters()).device)
    reference_hidden, reference_nll = final_hidden_and_nll(model, input_ids)
    reference_ppl = float(torch.tensor(reference_nll).exp())
    act_mse, ppl_increase = {}, {}
    for layer in range(len(decoder_layers(model))):
        with bypassed(model, layer):
            hidden, nll = final_hidden_and_nll(model, input_ids)
        act_mse[layer] = (hidden.float() - reference_hidden.float()).pow(2).mean().item()
        ppl_increase[layer] = float(torch.tensor(nll).exp()) - reference_ppl
    return act_mse, ppl_increase


@torch.no_grad()
def answer_log_likelihood(model, tokenizer, examples: list[dict]) -> float:
    """Mean per-token log-probability of each example's first reference answer after its input."""
    device = next(model.parameters()).device
    total = 0.0
    for example in examples:
        prompt = tokenizer(example["input"], return_tensors="pt").input_ids
        answer = tokenizer(" " + example["outputs"][0], add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([prompt, answer], dim=1).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, prompt.shape[1] - 1:-1].float()
        total += torch.log_softmax(logits, -1).gather(-1, answer[0].to(device)[:, None]).mean().item()
    return total / len(examples)


@torch.no_grad()
def task_drop(model, tokenizer, examples: list[dict]) -> dict[int, float]:
    """Task-guided importance (AR, KV): drop in answer log-likelihood when each layer is bypassed."""
    reference = answer_log_likelihood(model, tokenizer, examples)
    drops = {}
    for layer in range(len(decoder_layers(model))):
        with bypassed(model, layer):
            drops[layer] = reference - answer_log_likelihood(model, tokenizer, examples)
    return drops
