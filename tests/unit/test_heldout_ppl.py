"""Held-out perplexity: known answers (uniform logits give ppl = V) and agreement with HF's own loss."""
import math

import pytest
import torch
from tiny_models import tiny_teacher

from hybrid_distill.evaluate.run_eval import heldout_perplexity


class Rows:
    """The slice of PackedTokens that heldout_perplexity reads."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.num_sequences = tokens.shape[0]

    def batch(self, first_sequence: int, batch_size: int) -> torch.Tensor:
        return self.tokens[first_sequence:first_sequence + batch_size]


def random_rows(num_sequences=5, seq_len=12, vocab_size=128, seed=0) -> Rows:
    return Rows(torch.randint(vocab_size, (num_sequences, seq_len), generator=torch.Generator().manual_seed(seed)))


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    model = tiny_teacher("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    mean_nll, ppl = heldout_perplexity(model, random_rows(), num_sequences=5, batch_size=2)
    assert mean_nll == pytest.approx(math.log(128), rel=1e-6)
    assert ppl == pytest.approx(128, rel=1e-5)


@pytest.mark.parametrize("batch_size, chunk_tokens", [(5, 4096), (2, 7), (1, 1)])
def test_matches_hf_loss_whatever_the_batching(batch_size, chunk_tokens):
    model = tiny_teacher("qwen2")
    rows = random_rows()
    with torch.no_grad():
        expected = model(input_ids=rows.tokens, labels=rows.tokens).loss.item()  # token mean over equal rows
    mean_nll, ppl = heldout_perplexity(model, rows, 5, batch_size, chunk_tokens=chunk_tokens)
    assert mean_nll == pytest.approx(expected, rel=1e-5)
    assert ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_uses_at_most_the_available_sequences_and_keeps_the_mode():
    model = tiny_teacher("llama").train()
    rows = random_rows(num_sequences=3)
    assert heldout_perplexity(model, rows, 100, 2) == pytest.approx(heldout_perplexity(model, rows, 3, 3))
    assert model.training
    first_two = heldout_perplexity(model, rows, 2, 1)
    with torch.no_grad():
        expected = model.eval()(input_ids=rows.tokens[:2], labels=rows.tokens[:2]).loss.item()
    assert first_two[0] == pytest.approx(expected, rel=1e-5)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="num_sequences and batch_size must be positive"):
        heldout_perplexity(tiny_teacher("llama"), random_rows(), 0, 2)
