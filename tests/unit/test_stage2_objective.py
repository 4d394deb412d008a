"""The `distill` section's speed and memory options reach stage 2's student."""
import copy

import pytest
import torch

from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.recompute import is_recomputed
from hybrid_distill.models.student import build_student, decoder_layers
from tiny_models import tiny_teacher


def options(compile_blocks=False, checkpointing=False, bf16_weights=False) -> dict:
    return {"temperature": 1.0, "kl_chunk_tokens": 16, "activation_checkpointing": checkpointing,
            "compile_blocks": compile_blocks, "bf16_weights": bf16_weights, "compile_kl": False}


@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_options_apply_to_the_student(compile_blocks, checkpointing):
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [0], "gdn")
    objective = stage2_objective(options(compile_blocks, checkpointing), student, teacher, "all")
    layer = decoder_layers(objective.student)[1]
    assert (layer.mlp._compiled_call_impl is not None) is compile_blocks
    assert layer.self_attn._compiled_call_impl is None  # fla's kernel calls stay outside the compiled code
    compiled_maths = hasattr(layer.self_attn._kernel_inputs, "_torchdynamo_orig_callable")
    assert compiled_maths is compile_blocks
    softmax_layer = decoder_layers(objective.student)[0]
    assert (softmax_layer.self_attn._compiled_call_impl is not None) is compile_blocks
    teacher_layers = decoder_layers(objective.teacher)
    assert all((layer.self_attn._compiled_call_impl is not None) is compile_blocks and
               (layer.mlp._compiled_call_impl is not None) is compile_blocks for layer in teacher_layers)
    assert is_recomputed(objective.student) is checkpointing


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_bf16_weights_cast_the_student_only_and_keep_the_loss(mixer):
    """The teacher stays as loaded (a teacher cache written from it stays exact); the KL moves by bf16 rounding."""
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [0], mixer)
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    reference_loss, _ = stage2_objective(options(), copy.deepcopy(student), teacher, "all")(input_ids)
    objective = stage2_objective(options(bf16_weights=True), student, teacher, "all")
    assert {param.dtype for param in objective.student.parameters()} == {torch.bfloat16}
    assert {param.dtype for param in objective.teacher.parameters()} == {torch.float32}
    assert {buffer.dtype for buffer in objective.student.buffers() if buffer.is_floating_point()} <= {torch.float32}
    loss, _ = objective(input_ids)
    loss.backward()
    assert loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)
    assert loss.item() != reference_loss.item()
    assert all(param.grad.dtype == torch.bfloat16 for param in objective.student.parameters())


def test_compiled_blocks_keep_the_loss_and_gradients():
    """distill.compile_blocks (student's and teacher's dense blocks and softmax attention, the student's mixer
    maths with its short convs as shifted sums) computes the eager objective's loss and gradients."""
    teacher = tiny_teacher("llama")
    torch.manual_seed(0)
    student = build_student(teacher, [0], "gdn")
    with torch.no_grad():  # a conv that mixes positions: the identity init would hide a wrong tap
        for name, param in student.named_parameters():
            if "conv1d" in name or name.endswith(("a_proj.weight", "b_proj.weight")):
                param.normal_(std=0.3)
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compile_blocks in (False, True):
        objective = stage2_objective(options(compile_blocks), copy.deepcopy(student), copy.deepcopy(teacher), "all")
        loss, _ = objective(input_ids)
        loss.backward()
        results.append((loss.detach(), {name: param.grad for name, param in objective.student.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
