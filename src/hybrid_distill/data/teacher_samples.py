"""Training text sampled from the teacher itself, with a lean KV-cached loop instead of the slower `generate`."""
from __future__ import annotations

import inspect
import logging
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hybrid_distill.data.packed import DataError
from hybrid_distill.models.cache_names import cache_keyword

logger = logging.getLogger(__name__)

# Varied openings so that sampled data covers stories, facts, code, lists and dialogue rather than one mode.
DEFAULT_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins with",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of ten healthy breakfast ideas:\n1.",
    "Q: Why is the sky blue?\nA:",
    "User: Can you help me plan a trip to Japan?\nAssistant:",
    "Photosynthesis is the process by which plants",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\n",
    "Dear hiring manager, I am writing to apply for",
    "The recipe calls for the following ingredients:",
    "In mathematics, a prime number is",
    "Breaking news: scientists have discovered",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "SELECT name, COUNT(*) FROM orders WHERE",
    "The main differences between cats and dogs are",
    "\"Where are you going?\" she asked.",
    "Step 1: Preheat the oven to 180 degrees.",
    "The French Revolution was caused by",
    "To install the package, run the following command:",
    "My favourite book is",
)


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from [batch, vocab] logits by nucleus sampling; temperature <= 0 means greedy argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return sorted_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_token_id(tokenizer) -> int:
    """BOS where the tokenizer has one, else EOS (Qwen-style vocabularies open documents with end-of-text)."""
    for attribute in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, attribute, None)
        if token_id is not None:
            return int(token_id)
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has neither a BOS nor an EOS token")


def prompt_prefixes(tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """[prompts, length] ids: start token + each prompt left-truncated to the shortest, so no padding is needed."""
    start = [start_token_id(tokenizer)]
    if not prompts:
        return torch.tensor([start])
    bodies = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    body_length = min(min(len(body) for body in bodies), max_length - 1)
    if body_length <= 0:
        return torch.tensor([start])
    return torch.tensor([start + list(body[len(body) - body_length:]) for body in bodies])


def _forward_kwargs(model) -> dict:
    """Ask only for the last position's logits where the model supports it, avoiding a [batch, prompt, vocab] tensor."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def sample_from_teacher(
    model,
    tokenizer,
    num_sequences: int,
    seq_len: int,
    batch_size: int,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """[num_sequences, seq_len] token ids (prompt included) sampled from `model`; the same seed gives the same array.

    `prompts=None` uses DEFAULT_PROMPTS, cycled over the sequences; `prompts=[]` starts every sequence from BOS alone
    (then the tokenizer only needs bos_token_id / eos_token_id).
    """
    if num_sequences <= 0 or seq_len <= 0 or batch_size <= 0:
        raise DataError(
            f"num_sequences, seq_len and batch_size must be positive, got {num_sequences}, {seq_len}, {batch_size}"
        )
    prefixes = prompt_prefixes(tokenizer, DEFAULT_PROMPTS if prompts is None else prompts, seq_len)
    vocab_size = model.get_input_embeddings().num_embeddings
    if int(prefixes.max()) >= vocab_size:
        raise DataError(f"prompt token id {int(prefixes.max())} is outside the teacher's vocabulary of {vocab_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = np.empty((num_sequences, seq_len), dtype=np.int64)
    logger.info(
        "sampling %d x %d tokens from the teacher (batch %d, temperature %g, top_p %g, seed %d, %d prompts)",
        num_sequences, seq_len, batch_size, temperature, top_p, seed, prefixes.shape[0],
    )
    progress = tqdm(total=num_sequences * seq_len, desc="sampling teacher", unit="tok", unit_scale=True, disable=None)
    was_training = model.training
    model.eval()  # dropout would make the samples depend on more than the seed
    try:
        for first in range(0, num_sequences, batch_size):
            prompt_rows = torch.arange(first, min(first + batch_size, num_sequences)) % prefixes.shape[0]
            batch_ids = _sample_batch(
                model, prefixes[prompt_rows].to(device), seq_len, temperature, top_p, generator, progress
            )
            samples[first:first + len(prompt_rows)] = batch_ids.cpu().numpy()
    finally:
        model.train(was_training)
        progress.close()
    return samples


@torch.inference_mode()
def _sample_batch(model, prefix_ids, seq_len, temperature, top_p, generator, progress) -> torch.Tensor:
    """Prefill the shared-length prefixes once, then feed only each new token against the growing KV cache."""
    from transformers import DynamicCache

    rows, prefix_length = prefix_ids.shape
    batch_ids = torch.empty((rows, seq_len), dtype=torch.long, device=prefix_ids.device)
    batch_ids[:, :prefix_length] = prefix_ids
    progress.update(rows * prefix_length)
    cache = DynamicCache(config=model.config)
    forward_kwargs = {**_forward_kwargs(model), cache_keyword(model): cache}
    next_input = prefix_ids
    for position in range(prefix_length, seq_len):
        output = model(input_ids=next_input, use_cache=True, **forward_kwargs)
        next_tokens = sample_next_tokens(output.logits[:, -1], temperature, top_p, generator)
        batch_ids[:, position] = next_tokens
        next_input = next_tokens[:, None]
        progress.update(rows)
    return batch_ids
