"""The `distill` section's speed and memory options reach stage 2's student."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from hybrid_distill.distill.jobs import stage2_objective
from hybrid_distill.distill.recompute import is_recomputed
from hybrid_distill.models.student import build_student, decoder_layers
from tiny_models import tiny_teacher


def options(compile_blocks=False, checkpointing=False, bf16_weights=False, memory_budget=1.0,
            teacher_stream=False, teacher_ahead=False, budgeted_layers=None) -> dict:
    return {"temperature": 1.0, "kl_chunk_tokens": 16, "activation_checkpointing": checkpointing,
            "compile_blocks": compile_blocks, "bf16_weights": bf16_weights, "compile_kl": False,
            "activation_memory_budget": memory_budget, "activation_memory_budget_layers": budgeted_layers,
            "teacher_stream": teacher_stream,
            "teacher_ahead": teacher_ahead}


def compiled(function) -> bool:
    return hasattr(function, "_torchdynamo_orig_callable") and not getattr(function, "_torchdynamo_disable", False)


@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_options_apply_to_the_student(compile_blocks, checkpointing):
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [0], "gdn")
    objective = stage2_objective(options(compile_blocks, checkpointing), student, teacher, "all")
    student_layers, teacher_layers = decoder_layers(objective.student), decoder_layers(objective.teacher)
    for layer in student_layers + teacher_layers:  # whole layers, under the recomputation's wrapper if any
        forward = layer.forward.args[0] if checkpointing and layer in student_layers else layer.forward
        assert compiled(forward) is compile_blocks
    for layer in (student_layers[0], teacher_layers[0]):  # HF's projections unless HD_MERGED_PROJECTIONS=on
        assert "forward" not in vars(layer.self_attn) and "forward" not in vars(layer.mlp)
    mixer = student_layers[1].self_attn  # fla's kernel call stays outside the compiled code
    assert getattr(mixer._kernel, "_torchdynamo_disable", False) is compile_blocks
    assert is_recomputed(objective.student) is checkpointing
    assert not is_recomputed(objective.teacher)


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


@pytest.mark.parametrize("family, checkpointing", [("llama", False), ("llama", True), ("qwen2", False)])
def test_compiled_blocks_keep_the_loss_and_gradients(family, checkpointing):
    """distill.compile_blocks (student's and teacher's whole decoder layers, the mixer's short convs as shifted
    sums, fla's kernel call left out) computes the eager objective's loss and gradients, with the recomputation
    too, for Llama and Qwen2 layers; each layer's graph breaks only at the kernel call."""
    teacher = tiny_teacher(family)
    torch.manual_seed(0)
    student = build_student(teacher, [0], "gdn")
    with torch.no_grad():  # a conv that mixes positions: the identity init would hide a wrong tap
        for name, param in student.named_parameters():
            if "conv1d" in name or name.endswith(("a_proj.weight", "b_proj.weight")):
                param.normal_(std=0.3)
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compile_blocks in (False, True):
        objective = stage2_objective(options(compile_blocks, checkpointing), copy.deepcopy(student),
                                     copy.deepcopy(teacher), "all")
        for _ in range(2):  # the second step runs the compiled code without compiling
            objective.student.zero_grad(set_to_none=True)
            loss, _ = objective(input_ids)
            loss.backward()
        results.append((loss.detach(), {name: param.grad for name, param in objective.student.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    breaks = counters["graph_break"]
    assert breaks and all("_kernel" in reason for reason in breaks), list(breaks)


def test_compiled_layers_share_their_code_across_depth():
    """Doubling the layers adds no compiled graph: each layer kind compiles once, so a 30-layer model stays
    within Dynamo's recompile limit (past it, layers would silently run eager)."""
    graphs = []
    for layers in (4, 8):
        teacher = tiny_teacher("llama", num_hidden_layers=layers)
        student = build_student(teacher, [0], "gdn")
        torch._dynamo.reset()
        counters.clear()
        objective = stage2_objective(options(compile_blocks=True), student, teacher, "all")
        input_ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
        for _ in range(2):
            loss, _ = objective(input_ids)
            loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0


def test_the_activation_memory_budget_reaches_the_compilers_partitioner(monkeypatch):
    """Process-wide torch setting, read when the compiled code's backward is partitioned: each job sets its own
    (the GPU test shows a smaller budget saves fewer bytes for the same gradients)."""
    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", 1.0)
    teacher = tiny_teacher("llama")
    for budget in (0.6, 1.0):
        stage2_objective(options(memory_budget=budget), build_student(teacher, [0], "gdn"), teacher, "all")
        assert torch._functorch.config.activation_memory_budget == budget


def test_teacher_stream_runs_the_live_teacher_through_it_and_keeps_the_loss(monkeypatch):
    """distill.teacher_stream hands the live teacher's body to TeacherStream (on CPU it runs in line) and joins its
    output before the KL: the same loss and gradients; a batch with cached teacher rows runs no teacher there."""
    from hybrid_distill.distill.teacher_stream import TeacherStream

    calls = []
    start, join = TeacherStream.start, TeacherStream.join
    monkeypatch.setattr(TeacherStream, "start",
                        lambda self, fn, device: calls.append("start") or start(self, fn, device))
    monkeypatch.setattr(TeacherStream, "join", lambda self, tensor: calls.append("join") or join(self, tensor))
    teacher = tiny_teacher("llama")
    student = build_student(teacher, [0], "gdn")
    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for beside in (False, True):
        objective = stage2_objective(options(teacher_stream=beside), copy.deepcopy(student), teacher, "all")
        loss, _ = objective(input_ids)
        loss.backward()
        results[beside] = [loss] + [param.grad for param in objective.student.parameters()]
    assert calls == ["start", "join"]
    assert all(torch.equal(got, want) for got, want in zip(results[True], results[False], strict=True))
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state
    objective(input_ids, teacher_hidden=teacher_hidden)
    assert calls == ["start", "join"]


def test_stage2_jobs_run_the_live_teacher_on_its_own_stream_unless_a_config_says_no():
    """distill.teacher_stream defaults to on (+2% on graphed steps of both students, docs/performance.md); a
    config's `false` keeps the teacher in line."""
    from hybrid_distill.config.load import validate_config

    teacher = tiny_teacher("llama")
    for distill, beside in (({}, True), ({"teacher_stream": False}, False)):
        resolved = validate_config({"distill": distill})["distill"]
        objective = stage2_objective(resolved, build_student(teacher, [0], "gdn"), teacher, "all")
        assert (objective.teacher_stream is not None) is beside


def test_stage2_jobs_run_the_teacher_ahead_unless_a_config_says_no():
    """distill.teacher_ahead defaults to on (+1.6-2.4% on graphed all-softmax steps, docs/performance.md, session 33);
    a config's `false` runs the teacher on each micro-step's own batch."""
    from hybrid_distill.config.load import validate_config

    teacher = tiny_teacher("llama")
    for distill, ahead in (({}, True), ({"teacher_ahead": False}, False)):
        resolved = validate_config({"distill": distill})["distill"]
        objective = stage2_objective(resolved, build_student(teacher, [0], "gdn"), teacher, "all")
        assert objective.reads_following_ids is ahead
