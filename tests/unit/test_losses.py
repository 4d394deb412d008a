"""Exact-value tests of the distillation losses: chunked KL against the plain formula, and hidden alignment."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden, naive_kl
from hybrid_distill.distill.losses import hidden_alignment_loss, kl_distillation_loss


def random_case(num_tokens=13, student_dim=6, teacher_dim=5, vocab=11, dtype=torch.float64, seed=0,
                bias=False, scale=2.0):
    """Student/teacher hidden states and heads; `scale` spreads the logits so the KL is far from zero."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (scale * torch.randn(*shape, generator=generator)).to(dtype)

    case = dict(
        student_hidden=draw(num_tokens, student_dim).requires_grad_(),
        student_head_weight=draw(vocab, student_dim).requires_grad_(),
        teacher_hidden=draw(num_tokens, teacher_dim),
        teacher_head_weight=draw(vocab, teacher_dim),
        student_head_bias=draw(vocab).requires_grad_() if bias else None,
        teacher_head_bias=draw(vocab) if bias else None,
    )
    return case


def naive_from_case(case, temperature, token_mask=None):
    student_logits = case["student_hidden"] @ case["student_head_weight"].T
    teacher_logits = case["teacher_hidden"] @ case["teacher_head_weight"].T
    if case["student_head_bias"] is not None:
        student_logits = student_logits + case["student_head_bias"]
        teacher_logits = teacher_logits + case["teacher_head_bias"]
    return naive_kl(student_logits, teacher_logits, temperature, token_mask=token_mask)


def chunked_from_case(case, temperature, chunk_tokens, token_mask=None):
    return chunked_kl_from_hidden(**case, temperature=temperature, chunk_tokens=chunk_tokens, token_mask=token_mask)


def make_mask(kind, num_tokens):
    if kind is None:
        return None
    keep = torch.arange(num_tokens) % 3 != 1
    if kind == "bool":
        return keep
    return keep.double() * torch.linspace(0.5, 2.0, num_tokens, dtype=torch.float64)


def student_grads(case):
    names = ["student_hidden", "student_head_weight", "student_head_bias"]
    return [case[name].grad.clone() for name in names if case[name] is not None]


def clear_grads(case):
    for tensor in case.values():
        if tensor is not None:
            tensor.grad = None


# --- known answers -------------------------------------------------------------------------------------------

def test_known_answer_two_tokens_three_words():
    # Token 0: p_T = (1/4, 1/4, 1/2), p_S = uniform -> KL = ½ln(3/4) + ½ln(3/2) = ½ln(9/8). Token 1: equal -> 0.
    teacher_logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [1.0, 2.0, 3.0]], dtype=torch.float64)
    student_logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    expected = 0.25 * math.log(9 / 8)
    assert naive_kl(student_logits, teacher_logits).item() == pytest.approx(expected, rel=1e-12)

    # With identity heads the hidden states are the logits, so the chunked path has the same known answer.
    identity = torch.eye(3, dtype=torch.float64, requires_grad=True)
    loss = chunked_kl_from_hidden(student_logits, identity, teacher_logits, torch.eye(3, dtype=torch.float64),
                                  chunk_tokens=1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # ∂L/∂ℓ_S = τ (p_S − p_T) / N = ½ (1/3 − 1/4, 1/3 − 1/4, 1/3 − 1/2) for token 0, zero for token 1.
    expected_grad = torch.tensor([[1 / 24, 1 / 24, -1 / 12], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(student_logits.grad, expected_grad, rtol=0, atol=1e-12)


def test_known_answer_with_temperature_two():
    # Logits doubled and τ = 2 give the same distributions as above; the loss picks up τ² = 4.
    teacher_logits = torch.tensor([[0.0, 0.0, 2 * math.log(2.0)], [2.0, 4.0, 6.0]], dtype=torch.float64)
    student_logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]], dtype=torch.float64)
    expected = 4 * 0.25 * math.log(9 / 8)
    assert naive_kl(student_logits, teacher_logits, 2.0).item() == pytest.approx(expected, rel=1e-12)
    identity = torch.eye(3, dtype=torch.float64)
    chunked = chunked_kl_from_hidden(student_logits, identity, teacher_logits, identity, temperature=2.0)
    assert chunked.item() == pytest.approx(expected, rel=1e-12)


def test_known_answer_mask_drops_tokens():
    teacher_logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [5.0, 0.0, 0.0]], dtype=torch.float64)
    student_logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    identity = torch.eye(3, dtype=torch.float64)
    mask = torch.tensor([True, False])
    chunked = chunked_kl_from_hidden(student_logits, identity, teacher_logits, identity, token_mask=mask)
    assert chunked.item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)
    assert naive_kl(student_logits, teacher_logits, token_mask=mask).item() == pytest.approx(chunked.item())


# --- chunked forward equals the plain formula ----------------------------------------------------------------

@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 13, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_chunked_forward_matches_naive_fp64(chunk_tokens, temperature, bias, mask_kind):
    case = random_case(bias=bias)
    mask = make_mask(mask_kind, 13)
    expected = naive_from_case(case, temperature, mask)
    actual = chunked_from_case(case, temperature, chunk_tokens, mask)
    assert actual.dtype == torch.float64
    assert expected.item() > 0.1  # far from zero, so a relative tolerance means something
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_forward_matches_naive_fp32(chunk_tokens, temperature):
    case = random_case(num_tokens=40, student_dim=16, teacher_dim=12, vocab=50, dtype=torch.float32, bias=True,
                       scale=0.7)
    mask = make_mask("bool", 40)
    expected = naive_from_case(case, temperature, mask)
    actual = chunked_from_case(case, temperature, chunk_tokens, mask)
    assert actual.dtype == torch.float32 and actual.dim() == 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_batched_leading_dimensions_are_flattened():
    case = random_case(num_tokens=12)
    expected = naive_from_case(case, 1.0)
    batched = {name: None if t is None else t.detach().reshape(3, 4, -1) if "hidden" in name else t
               for name, t in case.items()}
    actual = chunked_kl_from_hidden(**batched, chunk_tokens=5, token_mask=torch.ones(3, 4, dtype=torch.bool))
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-10, atol=0)


# --- gradients -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck_tiny_fp64(temperature):
    case = random_case(num_tokens=5, student_dim=3, teacher_dim=2, vocab=4, bias=True, scale=1.0)
    mask = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)

    def loss_of(student_hidden, student_head_weight, student_head_bias):
        return chunked_kl_from_hidden(student_hidden, student_head_weight, case["teacher_hidden"],
                                      case["teacher_head_weight"], temperature=temperature, chunk_tokens=2,
                                      student_head_bias=student_head_bias,
                                      teacher_head_bias=case["teacher_head_bias"], token_mask=mask)

    inputs = (case["student_hidden"], case["student_head_weight"], case["student_head_bias"])
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 9, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mask_kind", [None, "float"])
def test_gradients_match_autograd_through_naive(chunk_tokens, temperature, mask_kind):
    case = random_case(num_tokens=37, student_dim=16, teacher_dim=8, vocab=60, bias=True)
    mask = make_mask(mask_kind, 37)
    naive_from_case(case, temperature, mask).backward()
    expected = student_grads(case)
    clear_grads(case)
    chunked_from_case(case, temperature, chunk_tokens, mask).backward()
    for actual, reference in zip(student_grads(case), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-12)


def test_gradients_match_in_fp32():
    case = random_case(num_tokens=64, student_dim=32, teacher_dim=24, vocab=100, dtype=torch.float32, scale=0.5)
    naive_from_case(case, 2.0).backward()
    expected = student_grads(case)
    clear_grads(case)
    chunked_from_case(case, 2.0, 10).backward()
    for actual, reference in zip(student_grads(case), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-6)


def test_grad_output_scales_gradients():
    case = random_case(bias=True)
    chunked_from_case(case, 2.0, 4).backward()
    single = student_grads(case)
    clear_grads(case)
    (3 * chunked_from_case(case, 2.0, 4)).backward()
    for tripled, reference in zip(student_grads(case), single, strict=True):
        torch.testing.assert_close(tripled, 3 * reference, rtol=1e-12, atol=0)


def test_tied_head_accumulates_with_other_uses():
    """The head weight doubles as the embedding table and appears in a second loss term, as in tied LMs."""
    vocab, dim, num_tokens = 20, 8, 15
    generator = torch.Generator().manual_seed(3)
    token_ids = torch.randint(0, vocab, (num_tokens,), generator=generator)
    teacher_hidden = torch.randn(num_tokens, 6, generator=generator, dtype=torch.float64)
    teacher_head = torch.randn(vocab, 6, generator=generator, dtype=torch.float64)

    class TinyTiedStudent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Parameter(torch.randn(vocab, dim, generator=generator, dtype=torch.float64))
            self.mixer = torch.nn.Linear(dim, dim, dtype=torch.float64)

        def forward(self, ids):
            return torch.tanh(self.mixer(self.embedding[ids]))

    student = TinyTiedStudent()

    def total_loss(kl_fn):
        hidden = student(token_ids)
        return kl_fn(hidden) + 0.1 * student.embedding.pow(2).sum()

    total_loss(lambda h: naive_kl(h @ student.embedding.T, teacher_hidden @ teacher_head.T, 2.0)).backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    total_loss(lambda h: chunked_kl_from_hidden(h, student.embedding, teacher_hidden, teacher_head,
                                                temperature=2.0, chunk_tokens=4)).backward()
    for parameter, reference in zip(student.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-10, atol=1e-12)


def test_bf16_inputs_give_fp32_loss_and_input_dtype_grads():
    case = random_case(num_tokens=16, student_dim=8, teacher_dim=8, vocab=32, dtype=torch.float32, scale=0.5)
    reference = chunked_from_case(case, 1.0, 5)
    reference.backward()
    reference_grads = student_grads(case)
    low = {name: None if t is None else t.detach().bfloat16().requires_grad_(t.requires_grad)
           for name, t in case.items()}
    loss = chunked_from_case(low, 1.0, 5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference.detach(), rtol=3e-2, atol=1e-3)
    loss.backward()
    for actual, expected in zip(student_grads(low), reference_grads, strict=True):
        assert actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual.float(), expected, rtol=5e-2, atol=2e-3)


def bf16_case(num_tokens=16, dim=8, vocab=32):
    """A case whose values are all exact in bf16, as bf16 tensors (distill.bf16_weights' heads and hidden states)."""
    case = random_case(num_tokens=num_tokens, student_dim=dim, teacher_dim=dim, vocab=vocab, dtype=torch.float32,
                       scale=0.5)
    return {name: None if t is None else t.detach().bfloat16().requires_grad_(t.requires_grad)
            for name, t in case.items()}


class HeadCasts(TorchDispatchMode):
    """Counts the dtype casts of tensors shaped like a vocab head, autocast's own among them."""

    def __init__(self, head_shape):
        super().__init__()
        self.head_shape, self.count = tuple(head_shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.head_shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("heads, most_casts", [("autocast", 1), ("float32", None)])
def test_autocast_bf16_heads_are_not_cast_per_chunk(heads, most_casts, monkeypatch):
    """Under autocast the head GEMMs run in its dtype: bf16 heads go in as they are, where an upcast head would be
    cast back at the chunks' GEMMs (in a graphed step, whose autocast keeps no cast cache, 24 casts of a
    49,152 x 576 head per step). The one head-shaped cast left is the float32 weight gradient's, to the head's dtype."""
    monkeypatch.setenv("HD_KL_HEADS", heads)
    case = bf16_case()
    with torch.autocast("cpu", dtype=torch.bfloat16), HeadCasts(case["student_head_weight"].shape) as casts:
        chunked_from_case(case, 1.0, 4).backward()
    if most_casts is None:  # HD_KL_HEADS=float32, the way before session 28: float32 heads cast back per chunk
        assert casts.count > 4
    else:
        assert casts.count == most_casts


def test_kl_heads_choice_is_checked(monkeypatch):
    monkeypatch.setenv("HD_KL_HEADS", "fp8")
    with pytest.raises(ValueError, match="HD_KL_HEADS must be one of autocast, float32"):
        chunked_from_case(bf16_case(), 1.0, 4)


def test_autocast_gives_bf16_and_float32_inputs_the_same_values():
    """Under autocast float32 heads are cast to bf16 once per call: the same GEMM operands as bf16 heads, so the
    same loss and gradients, bit for bit."""
    low = bf16_case()
    wide = {name: None if t is None else t.detach().float().requires_grad_(t.requires_grad)
            for name, t in low.items()}
    losses = []
    for case in (low, wide):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_from_case(case, 2.0, 5)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for actual, expected in zip(student_grads(wide), student_grads(low), strict=True):
        assert actual.dtype == torch.float32
        assert torch.equal(actual.bfloat16(), expected)


# --- properties and errors -------------------------------------------------------------------------------------

def test_identical_logits_give_zero_loss_and_gradient():
    case = random_case(student_dim=5, teacher_dim=5, bias=True)
    same = dict(case, teacher_hidden=case["student_hidden"].detach(),
                teacher_head_weight=case["student_head_weight"].detach(),
                teacher_head_bias=case["student_head_bias"].detach())
    loss = chunked_from_case(same, 2.0, 4)
    assert loss.item() == 0.0
    loss.backward()
    for grad in student_grads(same):
        assert grad.abs().max().item() < 1e-15


@pytest.mark.parametrize("seed", range(10))
def test_kl_is_non_negative(seed):
    case = random_case(seed=seed, dtype=torch.float32, scale=0.3 * (seed + 1))
    assert chunked_from_case(case, 1.0 + seed / 4, 3).item() >= 0.0


def test_all_masked_batch_is_zero_not_nan():
    case = random_case()
    loss = chunked_from_case(case, 1.0, 4, token_mask=torch.zeros(13, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert all(grad.abs().max().item() == 0.0 for grad in student_grads(case))


def test_no_grad_evaluation_matches_training_value():
    case = random_case()
    with torch.no_grad():
        evaluated = chunked_from_case(case, 2.0, 4)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, chunked_from_case(case, 2.0, 4).detach(), rtol=0, atol=0)


def test_teacher_requiring_grad_is_refused():
    case = random_case()
    case["teacher_head_weight"].requires_grad_()
    with pytest.raises(ValueError, match="teacher_head_weight"):
        chunked_from_case(case, 1.0, 4)


def test_bad_arguments_are_refused():
    case = random_case()
    with pytest.raises(ValueError, match="temperature"):
        chunked_from_case(case, 0.0, 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_from_case(case, 1.0, 0)
    with pytest.raises(ValueError, match="token_mask"):
        chunked_from_case(case, 1.0, 4, token_mask=torch.ones(12, dtype=torch.bool))


def test_losses_module_reexports_the_chunked_kl():
    assert kl_distillation_loss is chunked_kl_from_hidden


# --- stage 1: hidden alignment ---------------------------------------------------------------------------------

def test_hidden_alignment_known_answer():
    # Layer 0: per-token squared norms 1+4 = 5 and 9+16 = 25 -> mean 15. Layer 1: 1 and 0 -> mean 0.5.
    student = [torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True),
               torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], requires_grad=True)]
    teacher = [torch.zeros(1, 2, 2), torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])]
    total, per_layer = hidden_alignment_loss(student, teacher)
    assert per_layer == [15.0, 0.5]
    assert total.item() == 15.5 and total.requires_grad
    total.backward()
    # d/dU_S of mean_t ‖U_S − U_T‖² = 2 (U_S − U_T) / T with T = 2 tokens.
    torch.testing.assert_close(student[0].grad, student[0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(student[1].grad, torch.tensor([[[0.0, -1.0], [0.0, 0.0]]]), rtol=0, atol=0)


def test_hidden_alignment_averages_over_batch_and_does_not_train_the_teacher():
    student = [torch.full((2, 3, 4), 1.0, requires_grad=True)]
    teacher = [torch.zeros(2, 3, 4, requires_grad=True)]
    total, per_layer = hidden_alignment_loss(student, teacher)
    assert per_layer == [4.0]  # every token: four squared differences of one
    total.backward()
    assert teacher[0].grad is None


def test_hidden_alignment_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="2 student layers but 1 teacher"):
        hidden_alignment_loss([torch.zeros(1, 2, 3)] * 2, [torch.zeros(1, 2, 3)])
    with pytest.raises(ValueError, match="layer 1"):
        hidden_alignment_loss([torch.zeros(1, 2, 3)] * 2, [torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)])
