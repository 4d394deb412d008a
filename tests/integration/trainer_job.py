"""A tiny training job for the trainer tests, run in-process or as a (possibly killed) subprocess.

TRAINER_JOB_KILL_AFTER_SAVE=k makes the job SIGKILL itself right after the state of step k is in place;
TRAINER_JOB_KILL_DURING_SAVE=k makes it SIGKILL itself in place of publishing that state.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybrid_distill.distill import atomic
from hybrid_distill.distill.trainer import TrainSettings, train

VOCAB, SEQ_LEN, NUM_SEQUENCES = 32, 8, 64


class TinyTokens:
    """Stand-in for data.packed.PackedTokens: fixed random token rows, read with wrap-around."""

    def __init__(self, num_sequences: int = NUM_SEQUENCES, seq_len: int = SEQ_LEN, seed: int = 1234):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (num_sequences, seq_len), generator=generator)
        self.num_sequences, self.seq_len = num_sequences, seq_len

    def batch(self, first_sequence: int, batch_size: int) -> torch.Tensor:
        rows = (first_sequence + torch.arange(batch_size)) % self.num_sequences
        return self.tokens[rows]


class TinyLM(torch.nn.Module):
    """Embedding + two linear maps trained by next-token cross-entropy, beside a frozen 'teacher' layer."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, VOCAB)
        self.teacher = torch.nn.Linear(width, width)
        self.teacher.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor):
        hidden = self.embed(input_ids[:, :-1])
        hidden = hidden + torch.tanh(self.mix(hidden)) + 0.0 * self.teacher(hidden)
        logits = self.head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
        accuracy = (logits.argmax(-1) == input_ids[:, 1:]).float().mean()
        return loss, {"accuracy": accuracy.item()}


def trainable_weights(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in objective.named_parameters() if param.requires_grad}


def _kill_hooks() -> None:
    kill_after = os.environ.get("TRAINER_JOB_KILL_AFTER_SAVE")
    kill_during = os.environ.get("TRAINER_JOB_KILL_DURING_SAVE")
    publish = atomic.publish_dir

    def publish_then_maybe_die(staging: Path, final: Path) -> None:
        if kill_during and final.name == f"step_{int(kill_during):08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(staging, final)
        if kill_after and final.name == f"step_{int(kill_after):08d}":
            os.kill(os.getpid(), signal.SIGKILL)

    import hybrid_distill.distill.trainer as trainer

    trainer.publish_dir = publish_then_maybe_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    _kill_hooks()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    settings = TrainSettings(
        token_budget=args.steps * args.micro_batch * args.grad_accum * world * SEQ_LEN,
        micro_batch_size=args.micro_batch, grad_accum=args.grad_accum, lr=3e-2, warmup_steps=2,
        save_every=args.save_every, max_grad_norm=0.5)
    result = train(TinyLM(), TinyTokens(), settings, args.out, description="tiny")
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(trainable_weights(result.objective), args.out / "final.safetensors")
        (args.out / "result.json").write_text(json.dumps({"step": result.step, "tokens": result.tokens,
                                                          "loss": result.loss, "resumed": result.resumed}))


if __name__ == "__main__":
    main()
