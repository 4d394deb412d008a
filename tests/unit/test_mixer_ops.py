"""The chunked PyTorch ops compute the same function as their token-by-token recurrences."""
import pytest
import torch
import torch.nn.functional as F

from hybrid_distill.models.mixers import torch_ops


def inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, length, 3, 8)
    q = torch.randn(shape, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(2, length, 3, 5, generator=g, dtype=torch.float64)
    state = torch.randn(2, 3, 8, 5, generator=g, dtype=torch.float64)
    return q, k, v, state, g


@pytest.mark.parametrize("length,chunk", [(1, 4), (13, 4), (16, 16), (37, 8)])
def test_gated_delta_rule_chunked_equals_recurrent(length, chunk):
    q, k, v, state, g = inputs(length)
    decay = -torch.rand(2, length, 3, generator=g, dtype=torch.float64)
    beta = torch.rand(2, length, 3, generator=g, dtype=torch.float64)
    ref_out, ref_state = torch_ops.gated_delta_rule_recurrent(q, k, v, decay, beta, 0.35, state, True)
    out, final = torch_ops.gated_delta_rule_chunked(q, k, v, decay, beta, 0.35, state, True, chunk_size=chunk)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_state.to(final.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,chunk", [(1, 4), (13, 4), (37, 8)])
def test_gla_chunked_equals_recurrent(length, chunk):
    q, k, v, state, g = inputs(length)
    decay = F.logsigmoid(torch.randn(2, length, 3, 8, generator=g, dtype=torch.float64) * 3) / 2
    ref_out, ref_state = torch_ops.gla_recurrent(q, k, v, decay, 0.35, state, True)
    out, final = torch_ops.gla_chunked(q, k, v, decay, 0.35, state, True, chunk_size=chunk)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_state.to(final.dtype), atol=1e-5, rtol=1e-5)


def test_delta_rule_overwrites_a_key_with_beta_one():
    """Known answer: with beta = 1 and no decay, writing (k, v1) then (k, v2) leaves exactly v2 under k."""
    k = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    k[..., 0] = 1.0
    v = torch.tensor([[[[1.0, 2.0]]], [[[5.0, -1.0]]]], dtype=torch.float64).reshape(1, 2, 1, 2)
    out, state = torch_ops.gated_delta_rule_recurrent(k, k, v, torch.zeros(1, 2, 1, dtype=torch.float64),
                                                      torch.ones(1, 2, 1, dtype=torch.float64), 1.0, None, True)
    assert torch.allclose(out[0, 1, 0], torch.tensor([5.0, -1.0], dtype=torch.float64))
    assert torch.allclose(state[0, 0, 0], torch.tensor([5.0, -1.0], dtype=torch.float64))


def random_short_conv(bias: bool):
    """A 6-channel, 4-tap short conv with random taps (and bias): the identity init would hide a wrong tap."""
    from hybrid_distill.models.mixers.short_conv import ShortConvolution

    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4, bias=bias)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_decoding_token_by_token_equals_the_whole_sequence(bias):
    """The one-token path (a weighted sum) and the sequence path (conv1d) are the same causal convolution."""
    conv = random_short_conv(bias)
    inputs = torch.randn(2, 7, 6)
    whole, whole_cache = conv(inputs)
    prefix, cache = conv(inputs[:, :3])
    steps = [prefix]
    for t in range(3, 7):
        out, cache = conv(inputs[:, t:t + 1], cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache, whole_cache)


@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_compiled_as_shifted_sums_equals_the_conv(bias):
    """Under torch.compile the sequence path is written as shifted multiply-adds: same outputs, cache and
    gradients (inputs, taps, bias) as ATen's conv, from an empty and from a carried cache."""
    conv = random_short_conv(bias)
    compiled = torch.compile(conv.forward, dynamic=False, backend="aot_eager")  # traced: is_compiling() is True
    inputs, carried = torch.randn(2, 7, 6), torch.randn(2, 6, 3)
    for cache in (None, carried):
        results = []
        for forward in (conv.forward, compiled):
            conv.zero_grad()
            x = inputs.clone().requires_grad_()
            out, new_cache = forward(x, cache)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out, new_cache, x.grad, [p.grad.clone() for p in conv.parameters()]))
        (out, new_cache, x_grad, grads), (c_out, c_cache, c_x_grad, c_grads) = results
        torch.testing.assert_close(c_out, out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_cache, new_cache)
        torch.testing.assert_close(c_x_grad, x_grad, rtol=1e-5, atol=1e-6)
        for c_grad, grad in zip(c_grads, grads, strict=True):
            torch.testing.assert_close(c_grad, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 7])
def test_short_conv_cache_after_a_sequence_is_its_last_inputs(length):
    """The cache fla's conv path returns (the last kernel_size - 1 inputs, zeros before the start) is the conv's."""
    conv = random_short_conv(bias=False)
    x = torch.randn(2, length, 6)
    _, cache = conv(x)
    torch.testing.assert_close(conv._last_inputs(x), cache, rtol=0, atol=0)


@pytest.mark.parametrize("switch,allowed", [("HD_SHORT_CONV", "auto, torch, fla or triton"),
                                            ("HD_QK_L2NORM", "torch or fla")])
def test_fla_op_switches_are_checked_and_stay_off_the_cpu(switch, allowed, monkeypatch):
    """A switch that moves a GDN op into fla's kernels (short convs, q/k L2 norms) leaves a CPU mixer's output as
    it was, inside recorded steps too; a value other than those allowed is refused by name."""
    from hybrid_distill.models.mixers import MixerSpec, kernels, make_mixer

    torch.manual_seed(0)
    mixer = make_mixer(MixerSpec(kind="gdn", hidden_size=32, num_heads=2, head_dim=16), 0)
    with torch.no_grad():
        for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
            conv.weight.normal_()  # not the identity init, which would hide the conv
    hidden = torch.randn(2, 9, 32)
    expected, _ = mixer(hidden)
    monkeypatch.setenv(switch, "fla")
    torch.testing.assert_close(mixer(hidden)[0], expected, rtol=0, atol=0)
    monkeypatch.delenv(switch)
    with kernels.graphed_steps():
        torch.testing.assert_close(mixer(hidden)[0], expected, rtol=0, atol=0)
    monkeypatch.setenv(switch, "cuda")
    with pytest.raises(ValueError, match=f"{switch} must be {allowed}, not 'cuda'"):
        mixer(hidden)


def test_short_conv_picks_a_kernel_inside_recorded_steps_only(monkeypatch):
    """By default the short conv runs our Triton kernel in the steps a CUDA graph records (where it was the fastest)
    and PyTorch's code elsewhere (where fla's launches were slower); a set HD_SHORT_CONV wins in both; the q/k norm
    stays on torch unless set; leaving a nested block restores the outer choice."""
    from hybrid_distill.models.mixers import kernels

    monkeypatch.delenv("HD_SHORT_CONV", raising=False)
    monkeypatch.delenv("HD_QK_L2NORM", raising=False)
    assert kernels.op_choice("HD_SHORT_CONV") == "torch"
    with kernels.graphed_steps():
        assert kernels.op_choice("HD_SHORT_CONV") == "triton" and kernels.op_choice("HD_QK_L2NORM") == "torch"
        with kernels.graphed_steps():
            pass
        assert kernels.op_choice("HD_SHORT_CONV") == "triton"
    assert kernels.op_choice("HD_SHORT_CONV") == "torch"
    assert [kernels.op_choice("HD_SHORT_CONV", graphed) for graphed in (False, True)] == ["torch", "triton"]
    for forced in ("torch", "fla", "triton"):
        monkeypatch.setenv("HD_SHORT_CONV", forced)
        with kernels.graphed_steps():
            assert kernels.op_choice("HD_SHORT_CONV") == forced
        assert kernels.op_choice("HD_SHORT_CONV") == forced
    assert not kernels.use_kernel_short_conv(torch.zeros(1, 2, 3))  # a CPU tensor takes no kernel


@pytest.mark.parametrize("taps,kernel_calls", [(4, 1), (5, 0)])
def test_short_conv_wider_than_the_kernels_runs_pytorch_code(taps, kernel_calls, monkeypatch):
    """A sequence's conv goes to the kernel the switch picks only up to KERNEL_CONV_MAX_TAPS (4) taps, the width our
    kernel is written for; a wider one runs PyTorch's code even where a kernel is chosen."""
    from hybrid_distill.models.mixers import kernels
    from hybrid_distill.models.mixers.short_conv import ShortConvolution

    calls = []
    monkeypatch.setattr(kernels, "use_kernel_short_conv", lambda x: True)
    monkeypatch.setattr(kernels, "short_conv_silu", lambda x, weight, bias: calls.append(weight.shape) or x)
    conv = ShortConvolution(6, kernel_size=taps)
    conv(torch.randn(2, 7, 6))
    assert calls == [(6, taps)] * kernel_calls


def test_l2_normalize_is_fla_formula():
    """q and k are normalised as fla's l2norm does, x / sqrt(sum x^2 + 1e-6): unit length for ordinary vectors,
    and a near-zero vector stays near zero instead of being blown up to unit length."""
    x = torch.tensor([[3.0, 4.0], [3e-4, 4e-4]])
    out = torch_ops.l2_normalize(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], x[1] / (25e-8 + 1e-6) ** 0.5)
    assert out.dtype == x.dtype and torch_ops.l2_normalize(x.bfloat16()).dtype == torch.bfloat16


def test_gdn_kernel_normalising_qk_itself_computes_the_same():
    """gated_delta_rule(normalize_qk=True) on raw q, k (what HD_QK_L2NORM=fla has fla's kernel do on CUDA) equals
    it on normalised ones."""
    from hybrid_distill.models.mixers import kernels

    q, k, v, state, g = inputs(13)
    q, k = q * 3.0, k * 0.5
    decay = -torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    beta = torch.rand(2, 13, 3, generator=g, dtype=torch.float64)
    raw = kernels.gated_delta_rule(q, k, v, decay, beta, 0.35, state, True, normalize_qk=True)
    normalised = kernels.gated_delta_rule(torch_ops.l2_normalize(q), torch_ops.l2_normalize(k), v, decay, beta, 0.35,
                                          state, True)
    for a, b in zip(raw, normalised, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unnormalised = kernels.gated_delta_rule(q, k, v, decay, beta, 0.35, state, True)
    assert (unnormalised[0] - raw[0]).abs().max() > 1e-3  # the switch does something


@pytest.mark.parametrize("kind,heads,qkv_bias", [("gdn", 9, False), ("gdn", 16, True), ("gla", 3, True)])
def test_input_projections_equal_one_linear_per_weight(kind, heads, qkv_bias):
    """A sequence runs q, k, v and the gate projections as one GEMM over their concatenated (padded) weights, a
    decode token as one product per weight (GDN's two gates as one weighted sum): both give each projection's own
    outputs, and the sequence's GEMM gives each weight (and bias, and the input) its own gradient."""
    from hybrid_distill.models.mixers import make_mixer
    from hybrid_distill.models.mixers.spec import MixerSpec

    torch.manual_seed(0)
    mixer = make_mixer(MixerSpec(kind=kind, hidden_size=32, num_heads=heads, head_dim=8, qkv_bias=qkv_bias), 0)
    linears = [mixer.q_proj, mixer.k_proj, mixer.v_proj, *mixer._gate_linears()]
    assert len(linears) == (5 if kind == "gdn" else 4)
    with torch.no_grad():
        for linear in linears:
            linear.weight.normal_()
            if linear.bias is not None:
                linear.bias.normal_()
    for length in (5, 1):
        hidden = torch.randn(2, length, 32, requires_grad=True)
        qkv, gates = mixer._project_inputs(hidden)
        outputs = qkv + gates
        if length > 1:  # one GEMM's columns, its rows a multiple of 16 elements (Triton's vector loads need that)
            assert len({out.stride(1) for out in outputs}) == 1 and outputs[0].stride(1) % 16 == 0
        expected = [linear(hidden) for linear in linears]
        assert len(outputs) == len(expected)
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if length == 1:
            continue
        wrt = [hidden] + [p for linear in linears for p in linear.parameters()]
        grads = torch.autograd.grad(sum(out.square().sum() * (i + 1) for i, out in enumerate(outputs)), wrt)
        ref_grads = torch.autograd.grad(sum(out.square().sum() * (i + 1) for i, out in enumerate(expected)), wrt)
        for grad, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-4)
