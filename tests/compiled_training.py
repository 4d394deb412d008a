"""What the GPU tests of compiled training layers share: one bf16-autocast loss and its gradients, and the bound
within which two ways of computing them agree."""
import torch


def loss_and_grads(model, tokens):
    """A squared-logit loss under bf16 autocast and every parameter's gradient in float32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, use_cache=False).logits.float().square().mean()
    loss.backward()
    return loss.detach(), {name: param.grad.float() for name, param in model.named_parameters()}


def assert_same_training(got, want):
    """Loss within 1%, each gradient within 3% of its largest entry (bf16 roundings in another order)."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=0.03 * scale + 1e-8, msg=name)
