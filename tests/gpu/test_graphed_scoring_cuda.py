"""On CUDA, a scoring job's held-out KL snapshots (an eager no-grad forward between two replays, what the live
early stop reads) are the eager job's, with the paper configs' options (whole compiled layers, compiled KL, bf16
weights + float32 masters, the recomputation) and graphs on: the snapshot must neither disturb the graph's
buffers nor see stale weights."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.config.load import validate_config
from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.objectives import heldout_kl
from hybrid_distill.distill.trainer import GRAPH_WARMUP_STEPS, TrainSettings, train
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
OPTIONS = {"temperature": 1.0, "kl_chunk_tokens": 512, "compile_blocks": True, "compile_kl": True,
           "bf16_weights": True, "activation_checkpointing": True}
STEPS, EVERY = 8, 2


class Tokens:
    seq_len = 256

    def __init__(self, num_sequences, seed):
        self.num_sequences = num_sequences
        self.rows = torch.randint(0, SHAPE["vocab_size"], (num_sequences, self.seq_len),
                                  generator=torch.Generator().manual_seed(seed))

    def batch(self, first, size):
        return self.rows[(first + torch.arange(size)) % self.num_sequences]


def scoring_job(out, teacher, cuda_graphs: bool) -> list[tuple[int, float]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = build_student(teacher, [1], "gdn").cuda()
    distill = {**validate_config({})["distill"], **OPTIONS}
    objective = stage2_objective(distill, student, copy.deepcopy(teacher), "all")
    heldout = Tokens(8, seed=1)
    snapshots = []

    def snapshot(result):
        snapshots.append((result.step, heldout_kl(result.objective.student, result.objective.teacher, heldout, 8, 4,
                                                  1.0, 512)))
    settings = TrainSettings(token_budget=STEPS * 8 * Tokens.seq_len, micro_batch_size=8, grad_accum=1, lr=1e-3,
                             warmup_steps=0, schedule="constant", save_every=STEPS)
    train(objective, Tokens(64, seed=0), settings, out, description="scoring", snapshot_every=EVERY,
          on_snapshot=snapshot, cuda_graphs=cuda_graphs)
    return snapshots


@pytest.mark.usefixtures("one_short_conv")
def test_snapshots_between_replays_are_the_eager_jobs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    eager = scoring_job(tmp_path / "eager", teacher, cuda_graphs=False)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    graphed = scoring_job(tmp_path / "graphed", teacher, cuda_graphs=True)
    assert len(replays) == STEPS - GRAPH_WARMUP_STEPS
    assert [step for step, _ in graphed] == [step for step, _ in eager] == list(range(EVERY, STEPS + 1, EVERY))
    kls = [kl for _, kl in eager]
    assert kls[-1] < kls[0]  # the job learns, so a snapshot of stale weights would differ
    torch.testing.assert_close([kl for _, kl in graphed], kls, rtol=2e-3, atol=0)
