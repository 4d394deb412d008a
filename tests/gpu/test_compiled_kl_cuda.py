"""On CUDA under bf16 autocast, the chunked KL with compiled per-chunk maths (distill.compile_kl) gives the eager
chunked KL's loss and gradients: the compiled maths round the gradient logits to bf16 where autocast would. The
maths run as Inductor's kernel or as ours (HD_KL_ROWS=triton, distill/kl_rows_triton.py); ours is also checked
alone, each autotune candidate at SmolLM2's vocabulary, and replayed in a CUDA graph; the head gradient's chunks
add up in float32 inside their GEMMs."""
import pytest
import torch

from hybrid_distill.distill import kl_rows_triton
from hybrid_distill.distill.fused_kl import _kl_rows, chunked_kl_from_hidden

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]


@pytest.mark.parametrize("kl_rows", ["compiled", "triton"])
def test_compiled_kl_matches_eager_under_autocast(kl_rows, monkeypatch):
    monkeypatch.setenv("HD_KL_ROWS", kl_rows)
    generator = torch.Generator("cuda").manual_seed(0)
    tokens, hidden, vocab = 3000, 256, 8192  # chunks of 1024, 1024 and 952 tokens

    def draw(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    student_hidden, teacher_hidden = draw(tokens, hidden).bfloat16(), draw(tokens, hidden).bfloat16()
    student_weight, teacher_weight = 0.05 * draw(vocab, hidden), 0.05 * draw(vocab, hidden)

    def run(compiled):
        inputs = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_kl_from_hidden(inputs[0], inputs[1], teacher_hidden, teacher_weight, temperature=2.0,
                                          chunk_tokens=1024, compiled=compiled)
        loss.backward()
        return loss.item(), [tensor.grad.float() for tensor in inputs]

    eager_loss, eager_grads = run(False)
    loss, grads = run(True)
    errors = [((grad - eager).norm() / eager.norm()).item() for grad, eager in zip(grads, eager_grads)]
    print(f"loss eager {eager_loss:.6f}, compiled {loss:.6f}; relative gradient differences {errors}")
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    assert max(errors) < 1e-2


def smollm2_logits(rows=512, vocab=49152, seed=0):
    generator = torch.Generator("cuda").manual_seed(seed)
    ramp = torch.linspace(-20.0, 20.0, vocab, device="cuda")  # running maxima rise through the row
    student = (4.0 * torch.randn(rows, vocab, device="cuda", generator=generator) + ramp).bfloat16()
    teacher = (4.0 * torch.randn(rows, vocab, device="cuda", generator=generator) + 0.5 * ramp).bfloat16()
    return student, teacher


@pytest.mark.parametrize("config", kl_rows_triton._configs(looping=True), ids=lambda config: f"{config.kwargs['BLOCK']}x"
                         f"{config.num_warps}p{config.kwargs['PROGRAMS_PER_SM']}")
def test_every_kl_rows_candidate_gives_the_chunk_maths(config, monkeypatch):
    """The autotuner may pick any candidate on another GPU or vocabulary, so each one, run alone, gives the maths."""
    import triton

    only = triton.autotune([config], key=["V", "WRITE_GRAD"])(kl_rows_triton._kl_rows_kernel)
    monkeypatch.setattr(kl_rows_triton, "_kl_rows_tuned", only)
    student, teacher = smollm2_logits(rows=1200)  # more rows than 4 programs on each of an H100's 132 SMs: they loop
    scale = torch.rand(student.shape[0], 1, device="cuda")
    want_loss, want_grad = _kl_rows(student.double(), teacher.double(), 2.0, None, scale.double(), torch.float64)
    loss, grad = kl_rows_triton.kl_rows(student, teacher, 2.0, None, scale, torch.bfloat16)
    assert only.best_config.kwargs == config.kwargs  # the candidate under test ran
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    error = ((grad.double() - want_grad).norm() / want_grad.norm()).item()
    assert error < 4e-3, error  # bf16 rounding of the gradient


def test_kl_rows_replays_in_a_cuda_graph():
    student, teacher = smollm2_logits(rows=256)
    scale = torch.tensor(0.5, device="cuda")
    static_student, static_teacher = student.clone(), teacher.clone()
    for _ in range(2):  # autotuning and compilation happen here, outside the capture
        kl_rows_triton.kl_rows(static_student, static_teacher, 1.0, None, scale, torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_loss, graphed_grad = kl_rows_triton.kl_rows(static_student, static_teacher, 1.0, None, scale,
                                                            torch.bfloat16)
    other_student, other_teacher = smollm2_logits(rows=256, seed=1)
    static_student.copy_(other_student)
    static_teacher.copy_(other_teacher)
    graph.replay()
    loss, grad = kl_rows_triton.kl_rows(other_student, other_teacher, 1.0, None, scale, torch.bfloat16)
    assert graphed_loss.item() == loss.item()
    assert torch.equal(graphed_grad, grad)


def test_weight_gradient_chunks_add_in_float32_within_the_gemm():
    """The head's gradient sums its chunks in float32 inside one GEMM (addmm's out_dtype into the accumulator): as
    exact as float32 accumulation, where a bf16 product added afterwards is off by bf16's rounding (~1e-3)."""
    from hybrid_distill.distill import fused_kl

    generator = torch.Generator("cuda").manual_seed(0)
    grad_logits = torch.randn(4096, 512, device="cuda", generator=generator).bfloat16()
    hidden = torch.randn(4096, 256, device="cuda", generator=generator).bfloat16()
    accumulator = torch.randn(512, 256, device="cuda", generator=generator)
    want = accumulator.double() + grad_logits.double().T @ hidden.double()
    assert fused_kl._accumulating_gemm_works(accumulator.device)  # this torch has it: the one-GEMM path runs
    fused_kl._add_weight_grad(accumulator, grad_logits, hidden)
    error = ((accumulator.double() - want).norm() / want.norm()).item()
    assert error < 1e-5, error


def test_the_kl_chunk_holds_the_student_logits_and_one_part_of_the_teachers(monkeypatch):
    """Under our kernel a chunk's gradient is written over the student's logits and the teacher's logits are made
    HD_KL_TEACHER_ROWS rows at a time: the KL's memory above its inputs is one chunk of student logits and one part
    of the teacher's (the step's peak, with every activation held, comes here), with the same loss and gradients
    as when the teacher's whole chunk is made at once."""
    monkeypatch.setenv("HD_KL_ROWS", "triton")
    generator = torch.Generator("cuda").manual_seed(0)
    tokens, width, vocab, chunk, part = 8192, 576, 49152, 4096, 1024
    student_hidden = torch.randn(tokens, width, device="cuda", generator=generator).bfloat16()
    teacher_hidden = torch.randn(tokens, width, device="cuda", generator=generator).bfloat16()
    student_weight = (0.05 * torch.randn(vocab, width, device="cuda", generator=generator)).bfloat16()
    teacher_weight = (0.05 * torch.randn(vocab, width, device="cuda", generator=generator)).bfloat16()

    def run(teacher_rows):
        monkeypatch.setenv("HD_KL_TEACHER_ROWS", str(teacher_rows))
        inputs = [student_hidden.clone().requires_grad_(), student_weight.clone().requires_grad_()]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_kl_from_hidden(inputs[0], inputs[1], teacher_hidden, teacher_weight, temperature=2.0,
                                          chunk_tokens=chunk, compiled=True)
        torch.cuda.synchronize()
        above = torch.cuda.max_memory_allocated() - before
        loss.backward()
        return loss.item(), [tensor.grad for tensor in inputs], above

    run(part)  # the kernel autotunes here (it copies the logits while it times candidates)
    loss, grads, above = run(part)
    whole_loss, whole_grads, whole_above = run(0)
    logits_bytes = 2 * vocab  # one bf16 row
    head_gradient = 4 * vocab * width  # float32, summed over the chunks
    print(f"above the inputs: parts {above / 2**20:.0f} MiB, whole chunk {whole_above / 2**20:.0f} MiB")
    assert above <= (chunk + part) * logits_bytes + head_gradient + 64 * 2**20
    assert whole_above - above >= 0.9 * (chunk - part) * logits_bytes
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    assert all(torch.equal(grad, whole) for grad, whole in zip(grads, whole_grads))
