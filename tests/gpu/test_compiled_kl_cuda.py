"""On CUDA under bf16 autocast, the chunked KL with compiled per-chunk maths (distill.compile_kl) gives the eager
chunked KL's loss and gradients: the compiled maths round the gradient logits to bf16 where autocast would."""
import pytest
import torch

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]


def test_compiled_kl_matches_eager_under_autocast():
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
