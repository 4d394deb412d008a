"""On CUDA, a stage-2 step replayed as one CUDA graph (step_graph.py) trains as the eager step does: the same
losses on the same batches, each replay on its new batch, and the same weights after, with the paper configs'
options (whole compiled layers with fla's kernel left out, compiled KL, bf16 weights + float32 masters, and
with or without the recomputation), and with the live teacher on its own stream."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.config.load import validate_config
from hybrid_distill.distill.bench import train_step
from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.master_weights import adamw_for
from hybrid_distill.distill.step_graph import GraphedStep
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
OPTIONS = {"temperature": 1.0, "kl_chunk_tokens": 1024, "compile_blocks": True, "compile_kl": True,
           "bf16_weights": True}


def objective_and_optimizer(teacher, student, recompute: bool, capturable: bool, teacher_stream: bool = False):
    distill = {**validate_config({})["distill"], **OPTIONS, "activation_checkpointing": recompute,
               "teacher_stream": teacher_stream, "teacher_ahead": False}  # a new batch at every call
    objective = stage2_objective(distill, student, copy.deepcopy(teacher), "all").cuda()
    params = [p for p in objective.parameters() if p.requires_grad]
    lr = torch.tensor(1e-3, device="cuda") if capturable else 1e-3  # a graph reads a tensor rate, as the trainer's
    return objective, adamw_for(params, lr=lr, fused=True, capturable=capturable)


@pytest.mark.parametrize("recompute, teacher_stream, head_dim",
                         [(False, False, 64), (True, False, 64), (False, True, 64), (False, False, 128)],
                         ids=["stored", "recomputed", "teacher on its own stream", "head_dim 128"])
@pytest.mark.usefixtures("one_short_conv")
def test_a_replayed_step_trains_as_the_eager_step(recompute, teacher_stream, head_dim):
    """The eager reference runs the teacher in line; with distill.teacher_stream the replayed step forks the
    teacher onto its own stream and joins it before the KL, inside the graph. At head_dim 128 (3B teachers) fla
    runs GDN through FlashQLA where it is installed, so its kernels are captured too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    shape = {**SHAPE, "num_attention_heads": SHAPE["hidden_size"] // head_dim, "num_key_value_heads": 1,
             "head_dim": head_dim} if head_dim != SHAPE["head_dim"] else SHAPE
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).cuda().eval().requires_grad_(False)
    student = build_student(teacher, [1], "gdn").cuda()
    batches = [torch.randint(0, SHAPE["vocab_size"], (4, 512), device="cuda", generator=torch.Generator("cuda")
                             .manual_seed(seed)) for seed in range(4)]
    device = torch.device("cuda")

    eager, eager_optimizer = objective_and_optimizer(teacher, copy.deepcopy(student), recompute, capturable=False)
    eager_losses = [train_step(eager, batch, eager_optimizer, {}, device, autocast_cache=False).item()
                    for batch in batches]

    graphed, optimizer = objective_and_optimizer(teacher, copy.deepcopy(student), recompute, capturable=True,
                                                 teacher_stream=teacher_stream)
    step = GraphedStep(lambda inputs: train_step(graphed, inputs, optimizer, {}, device, zero_grad=False,
                                                 autocast_cache=False), optimizer, warmup=1)
    graphed_losses = [step(batch).item() for batch in batches]  # one eager warm-up, then capture and replays
    assert step.captured

    assert len(set(eager_losses)) == 4  # the batches differ, so a replay on stale inputs would show
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=2e-3, atol=0)
    changed = 0
    for (name, replayed), (_, reference), (_, initial) in zip(graphed.student.named_parameters(),
                                                              eager.student.named_parameters(),
                                                              student.named_parameters()):
        torch.testing.assert_close(replayed.float(), reference.float(), rtol=2e-2, atol=2e-3, msg=name)
        changed += not torch.equal(replayed.float().cpu(), initial.float().cpu())
    assert changed > len(list(student.parameters())) // 2  # the replays updated the weights


def test_recorded_steps_run_the_kernel_short_conv_and_replays_run_none(monkeypatch):
    """The warm-up calls and the capture run inside kernels.graphed_steps (so the short conv records our kernel);
    replays run no Python; the caller's code outside stays on PyTorch's conv."""
    from hybrid_distill.models.mixers import kernels

    monkeypatch.delenv("HD_SHORT_CONV", raising=False)
    weight = torch.zeros(3, device="cuda", requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    choices = []

    def step(x):
        choices.append(kernels.op_choice("HD_SHORT_CONV"))
        loss = (weight * x).square().sum()
        loss.backward()
        optimizer.step()
        return loss

    graphed = GraphedStep(step, optimizer, warmup=2)
    for _ in range(5):
        graphed(torch.ones(3, device="cuda"))
    assert choices == ["triton"] * 3  # two warm-up calls and the capture
    assert kernels.op_choice("HD_SHORT_CONV") == "torch"
