"""The `distill` section's speed and memory options reach stage 2's student."""
import pytest

from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.recompute import is_recomputed
from hybrid_distill.models.student import build_student, decoder_layers
from tiny_models import tiny_teacher


@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_options_apply_to_the_student(compile_blocks, checkpointing):
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [0], "gdn")
    distill = {"temperature": 1.0, "kl_chunk_tokens": 16, "activation_checkpointing": checkpointing,
               "compile_blocks": compile_blocks}
    objective = stage2_objective(distill, student, teacher, "all")
    layer = decoder_layers(objective.student)[1]
    assert (layer.mlp._compiled_call_impl is not None) is compile_blocks
    assert layer.self_attn._compiled_call_impl is None  # fla's kernel calls stay outside the compiled code
    compiled_maths = hasattr(layer.self_attn._kernel_inputs, "_torchdynamo_orig_callable")
    assert compiled_maths is compile_blocks
    assert is_recomputed(objective.student) is checkpointing
