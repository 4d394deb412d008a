"""On CUDA with fla's recurrent kernels, a CUDA-graph replay of the decode step computes what the eager step and
HF's dynamic-cache loop compute, for a teacher and a GDN hybrid."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder
from hybrid_distill.models.cache_names import cache_keyword, output_cache
from hybrid_distill.models.student import build_student, mixers_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
NEW_TOKENS = 8


def models(dtype):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().to(dtype).eval()
    hybrid = build_student(teacher, [1], "gdn").eval()
    with torch.no_grad():   # live gates: decays and betas differ per token and head
        for mixer in mixers_of(hybrid).values():
            for parameter in (mixer.a_proj.weight, mixer.b_proj.weight):
                parameter.normal_(0, 0.05)
    return {"teacher": teacher, "hybrid": hybrid}


def dynamic_greedy(model, prompt):
    with torch.no_grad():
        output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token, cache, logits = output.logits[:, -1].argmax(-1, keepdim=True), output_cache(output), []
        for _ in range(NEW_TOKENS):
            output = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
            cache = output_cache(output)
            logits.append(output.logits[:, -1].float())
            token = logits[-1].argmax(-1, keepdim=True)
    return logits


def decode(model, prompt, use_graph):
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, NEW_TOKENS, use_graph=use_graph)
    logits = []
    for _ in range(NEW_TOKENS):
        decoder.step()
        logits.append(decoder.last_logits.clone())
    return decoder, logits


@pytest.mark.parametrize("name", ["teacher", "hybrid"])
def test_graph_replay_equals_the_eager_step_in_bfloat16(name):
    model = models(torch.bfloat16)[name]
    prompt = torch.randint(SHAPE["vocab_size"], (4, 300), device="cuda")
    graphed, graph_logits = decode(model, prompt, use_graph=True)
    eager, eager_logits = decode(model, prompt, use_graph=False)
    assert graphed._graph is not None and eager._graph is None
    assert torch.equal(graphed.tokens, eager.tokens)
    for got, expected in zip(graph_logits, eager_logits):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["teacher", "hybrid"])
def test_graph_replay_equals_hf_dynamic_loop_in_float32(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = models(torch.float32)[name]
    prompt = torch.randint(SHAPE["vocab_size"], (2, 300), device="cuda")
    expected = dynamic_greedy(model, prompt)
    _, got = decode(model, prompt, use_graph=True)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m: f"step {step}: {m}")


def fused_hybrid(dtype, head_dim, options, mixer="gdn"):
    """A hybrid whose mixer parameters (gates, convs, norm) all differ from their init, at the given head size."""
    torch.manual_seed(0)
    shape = {**SHAPE, "head_dim": head_dim, "hidden_size": 4 * head_dim}
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).cuda().to(dtype).eval()
    hybrid = build_student(teacher, [1], mixer, **options).eval()
    with torch.no_grad():
        for mixer in mixers_of(hybrid).values():
            for name, parameter in mixer.named_parameters():
                if not name.startswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return hybrid


@pytest.mark.parametrize("mixer,head_dim,options", [("gdn", 64, {}), ("gdn", 128, {}),
                                                     ("gdn", 64, dict(use_output_gate=True)), ("gla", 64, {}),
                                                     ("gla", 128, dict(use_output_gate=True))])
def test_fused_step_replayed_equals_hf_dynamic_loop_in_float32(monkeypatch, mixer, head_dim, options):
    """HD_GDN_DECODE / HD_GLA_DECODE=fused (one kernel per linear layer and token) in a graph gives HF's dynamic
    loop's logits (fla's recurrent kernels)."""
    from hybrid_distill.models.mixers import decode_step_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    launches = []
    name = f"{mixer}_decode_step"
    step = getattr(decode_step_triton, name)
    monkeypatch.setattr(decode_step_triton, name, lambda *a, **k: launches.append(1) or step(*a, **k))
    monkeypatch.setenv(f"HD_{mixer.upper()}_DECODE", "fused")
    model = fused_hybrid(torch.float32, head_dim, options, mixer)
    prompt = torch.randint(SHAPE["vocab_size"], (2, 300), device="cuda")
    expected = dynamic_greedy(model, prompt)
    assert not launches   # HF's dynamic cache is not a fixed-address one
    decoder, got = decode(model, prompt, use_graph=True)
    assert decoder._graph is not None and launches and not decoder.deferred_writes
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m: f"step {index}: {m}")


@pytest.mark.parametrize("mixer,head_dim", [("gdn", 64), ("gdn", 128), ("gla", 128)])
def test_fused_step_in_bfloat16_replays_exactly_and_stays_near_the_compiled_path(monkeypatch, mixer, head_dim):
    model = fused_hybrid(torch.bfloat16, head_dim, {}, mixer)
    prompt = torch.randint(SHAPE["vocab_size"], (4, 300), device="cuda")
    switch = f"HD_{mixer.upper()}_DECODE"
    monkeypatch.setenv(switch, "compiled")
    _, compiled = decode(model, prompt, use_graph=True)
    monkeypatch.setenv(switch, "fused")
    graphed, graph_logits = decode(model, prompt, use_graph=True)
    eager, eager_logits = decode(model, prompt, use_graph=False)
    assert torch.equal(graphed.tokens, eager.tokens)
    for got, expected in zip(graph_logits, eager_logits):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the first step reads the same prefill in both paths; later ones may follow different greedy tokens
    scale = compiled[0].abs().max().item()
    assert (graph_logits[0] - compiled[0]).abs().max().item() <= 0.03 * scale
