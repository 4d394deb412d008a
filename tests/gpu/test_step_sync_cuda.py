"""On CUDA, a training step (batch upload, forward, backward, clipping, optimizer) never makes the host wait for
the GPU, so the host queues the next step's kernels while the GPU still runs this one. Logging steps may sync."""
import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.objectives import HiddenAlignment, LogitDistillation
from hybrid_distill.distill.precision import to_device
from hybrid_distill.distill.trainer import (TrainSettings, _accumulate_gradients, _clip, _clip_param_groups,
                                            _step_batches)
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)


class Tokens:
    num_sequences, seq_len = 64, 256

    def batch(self, first, size):
        return torch.randint(0, SHAPE["vocab_size"], (size, self.seq_len),
                             generator=torch.Generator().manual_seed(first))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_training_step_does_not_synchronise_the_host(stage):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    student = build_student(teacher, [1], "gdn").cuda()
    objective = HiddenAlignment(student, teacher) if stage == "stage1" else LogitDistillation(student, teacher, 1.0, 512)
    accelerator = Accelerator(mixed_precision="bf16")
    trainable = [(name, p) for name, p in objective.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-4, fused=True)
    model, optimizer = accelerator.prepare(objective, optimizer)
    clip_params = _clip_param_groups(trainable, objective.clip_groups() if stage == "stage1" else None)
    settings = TrainSettings(token_budget=10**6, micro_batch_size=4, grad_accum=2, lr=1e-4)

    def step(first):
        micro_batches, rows = _step_batches(Tokens(), first, settings, wants_indices=False)
        _accumulate_gradients(accelerator, model, to_device(micro_batches, "cuda"), rows, settings.grad_accum)
        _clip(clip_params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # kernel compilation and autotuning may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
