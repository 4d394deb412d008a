"""bf16 weights with float32 master copies: the same updates as float32 AdamW, none lost to rounding, exact resume."""
import pytest
import torch

from hybrid_distill.distill.master_weights import MasterWeightAdamW, adamw_for, cast_weights

OPTIONS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def bf16_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(torch.bfloat16)) for shape in [(4, 3), (5,)]]


def gradients(step, params):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(param.shape, generator=generator).to(param.dtype) for param in params]


def run_steps(optimizer, params, steps, first=0):
    for step in range(first, first + steps):
        for param, grad in zip(params, gradients(step, params)):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad()


def test_updates_equal_float32_adamw_on_the_same_gradients():
    params = bf16_params()
    reference = [torch.nn.Parameter(param.detach().float().clone()) for param in params]
    run_steps(MasterWeightAdamW(params, **OPTIONS), params, 5)
    float_optimizer = torch.optim.AdamW(reference, **OPTIONS)
    for step in range(5):  # the bf16 gradients, as the master optimizer saw them
        for param, grad in zip(reference, gradients(step, params)):
            param.grad = grad.float()
        float_optimizer.step()
    for param, expected in zip(params, reference):
        assert param.dtype == torch.bfloat16
        assert torch.equal(param.detach(), expected.detach().to(torch.bfloat16))


def test_updates_below_bf16_resolution_accumulate():
    """At lr 1e-4 each AdamW step moves a weight in [1, 2) by 1e-4, under bf16's spacing of 2^-7 there."""
    options = dict(OPTIONS, lr=1e-4, weight_decay=0.0)
    start = 1.0 + torch.rand(64, generator=torch.Generator().manual_seed(0))

    def trained(make_optimizer):
        param = torch.nn.Parameter(start.to(torch.bfloat16))
        optimizer = make_optimizer([param], **options)
        for _ in range(200):
            param.grad = -torch.ones_like(param)  # one direction: 200 steps add up to +0.02
            optimizer.step()
        return param.detach().float()

    assert torch.equal(trained(torch.optim.AdamW), start.to(torch.bfloat16).float())  # every update lost
    moved = trained(MasterWeightAdamW) - start
    assert torch.allclose(moved, torch.full_like(moved, 0.02), atol=2 ** -7)


def test_state_dict_resumes_exactly():
    straight = bf16_params()
    straight_optimizer = MasterWeightAdamW(straight, **OPTIONS)
    run_steps(straight_optimizer, straight, 6)

    resumed = bf16_params()
    first = MasterWeightAdamW(resumed, **OPTIONS)
    run_steps(first, resumed, 3)
    saved = first.state_dict()
    fresh_params = [torch.nn.Parameter(param.detach().clone()) for param in resumed]
    second = MasterWeightAdamW(fresh_params, **OPTIONS)
    second.load_state_dict(saved)
    run_steps(second, fresh_params, 3, first=3)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(fresh_params, straight))
    assert all(torch.equal(a, b) for a, b in zip(second.masters, straight_optimizer.masters))


def test_state_of_a_float32_optimizer_is_refused():
    params = bf16_params()
    float_state = torch.optim.AdamW([torch.nn.Parameter(p.detach().float()) for p in params], **OPTIONS).state_dict()
    with pytest.raises(ValueError, match="no float32 master weights.*distill.bf16_weights"):
        MasterWeightAdamW(params, **OPTIONS).load_state_dict(float_state)


def test_optimizer_follows_the_weights_precision():
    assert type(adamw_for([torch.nn.Parameter(torch.ones(2))], lr=1e-3)) is torch.optim.AdamW
    assert isinstance(adamw_for(bf16_params(), lr=1e-3), MasterWeightAdamW)
    with pytest.raises(ValueError, match="mix dtypes"):
        adamw_for([torch.nn.Parameter(torch.ones(2)), *bf16_params()], lr=1e-3)


def test_cast_weights_leaves_buffers_and_ties():
    module = torch.nn.Module()
    module.embed = torch.nn.Embedding(6, 4)
    module.head = torch.nn.Linear(4, 6, bias=False)
    module.head.weight = module.embed.weight  # tied, as SmolLM2's head is
    module.register_buffer("inv_freq", torch.rand(3))
    assert cast_weights(module, torch.bfloat16) == 1
    assert module.head.weight is module.embed.weight and module.embed.weight.dtype == torch.bfloat16
    assert module.inv_freq.dtype == torch.float32
