"""The graphable decode step computes what HF's dynamic-cache loop computes: same greedy tokens, same logits, for
teachers and hybrids. On CPU the step runs eagerly; tests/gpu/test_static_decode_cuda.py replays it as a graph."""
import pytest
import torch
from tiny_models import tiny_config, tiny_teacher
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hybrid_distill.evaluate.static_decode import StaticGreedyDecoder, _grouped_decode_attention
from hybrid_distill.models.cache_names import cache_keyword, output_cache
from hybrid_distill.models.mixers.cache_layer import RecurrentStateLayer
from hybrid_distill.models.static_cache import FixedAddressKVLayer, FixedAddressStateLayer
from hybrid_distill.models.student import build_student, mixers_of

pytestmark = pytest.mark.integration

PROMPT_LENGTH = 11
NEW_TOKENS = 6


def dynamic_greedy(model, prompt, new_tokens):
    """Reference: HF's own cache, one token per forward, default attention."""
    with torch.no_grad():
        output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        cache, tokens, logits = output_cache(output), [], []
        for _ in range(new_tokens):
            output = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
            cache = output_cache(output)
            logits.append(output.logits[:, -1].float())
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, 1), logits


def hybrid_with_live_gates(softmax_layers, mixer):
    """A hybrid whose fresh gate parameters are perturbed, so decays and betas differ per token and head."""
    model = build_student(tiny_teacher("llama"), softmax_layers, mixer).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in mixers_of(model).values():
            for name, parameter in module.named_parameters():
                if not name.startswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_teacher_static_steps_match_the_dynamic_loop(family):
    model = tiny_teacher(family)
    prompt = torch.randint(model.config.vocab_size, (3, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    expected_tokens, expected_logits = dynamic_greedy(model, prompt, NEW_TOKENS)
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, NEW_TOKENS)
    assert decoder._graph is None   # CPU: eager steps
    for step in range(NEW_TOKENS):
        decoder.step()
        torch.testing.assert_close(decoder.last_logits, expected_logits[step], rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder.tokens, expected_tokens)
    assert model.config._attn_implementation == "sdpa"   # the decode attention is switched back after each step


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
@pytest.mark.parametrize("softmax_layers", [[], [1, 3]])
def test_hybrid_static_steps_match_the_dynamic_loop(mixer, softmax_layers):
    model = hybrid_with_live_gates(softmax_layers, mixer)
    prompt = torch.randint(model.config.vocab_size, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(2))
    expected_tokens, expected_logits = dynamic_greedy(model, prompt, NEW_TOKENS)
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, NEW_TOKENS)
    kinds = [type(layer) for layer in decoder.cache.layers]
    assert kinds == [FixedAddressKVLayer if i in softmax_layers else FixedAddressStateLayer for i in range(4)]
    addresses = [tensor.data_ptr() for tensor in decoder._mutable()]
    for step in range(NEW_TOKENS):
        decoder.step()
        torch.testing.assert_close(decoder.last_logits, expected_logits[step], rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder.tokens, expected_tokens)
    assert [tensor.data_ptr() for tensor in decoder._mutable()] == addresses   # what a graph replay needs
    with pytest.raises(RuntimeError, match="6 new tokens"):
        decoder.step()


@pytest.mark.parametrize("mixer, in_place", [("gdn", True), ("gla", False)])
def test_gdn_writes_its_state_into_the_buffer_and_conv_caches_are_copied_after_the_step(mixer, in_place,
                                                                                        monkeypatch):
    """GDN's kernel call returns the cache's own buffer, so `store` copies nothing; GLA's new state is a new tensor.
    Every conv cache is listed for the one copy after the forward, and the list is empty after each step."""
    model = hybrid_with_live_gates([1], mixer)
    prompt = torch.randint(model.config.vocab_size, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(4))
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, 2)
    stored, listed = [], []
    original_store = FixedAddressStateLayer.store

    def recording_store(layer, conv_caches, recurrent_state, new_tokens):
        stored.append(recurrent_state is layer.recurrent_state)
        original_store(layer, conv_caches, recurrent_state, new_tokens)
        listed.append(len(decoder.deferred_writes))

    monkeypatch.setattr(FixedAddressStateLayer, "store", recording_store)
    decoder.step()
    assert stored == [in_place] * 3   # the three linear layers of the tiny hybrid
    assert listed == [3, 6, 9]        # q, k and v conv caches per layer, none copied yet
    assert decoder.deferred_writes == []


def test_grouped_attention_equals_sdpa_with_repeated_kv_heads():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 6, 1, 8, generator=generator)
    key, value = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    mask = torch.zeros(1, 1, 1, 9)
    mask[..., 7:] = torch.finfo(torch.float32).min   # two unwritten buffer slots
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    expected, _ = sdpa_attention_forward(module, query, key[:, :, :7], value[:, :, :7], None, scaling=0.5)
    got, _ = _grouped_decode_attention(module, query, key, value, mask, scaling=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_use_is_refused():
    model = tiny_teacher("llama")
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticGreedyDecoder.after_prefill(model, prompt, 0)
    with pytest.raises(ValueError, match="CUDA"):
        StaticGreedyDecoder.after_prefill(model, prompt, 2, use_graph=True)
    windowed = tiny_teacher("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        StaticGreedyDecoder.after_prefill(windowed, prompt, 2)
    keys = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="capacity 5"):
        FixedAddressKVLayer(keys, keys, 5, torch.tensor([5]))
    layer = FixedAddressKVLayer(keys, keys, 8, torch.tensor([5]))
    with pytest.raises(ValueError, match="one token per step"):
        layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="filled by a prefill"):
        FixedAddressStateLayer(RecurrentStateLayer())


def test_decode_cache_holds_only_its_own_bytes():
    """The conv cache of a prefill is a copy, not a view keeping the whole padded prompt alive."""
    model = build_student(tiny_teacher("llama"), [], "gdn").eval()
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.zeros(2, 50, dtype=torch.long), use_cache=True))
    for layer in cache.layers:
        for conv_cache in layer.conv_caches:
            assert conv_cache.untyped_storage().nbytes() == conv_cache.numel() * conv_cache.element_size()
    assert tiny_config().num_hidden_layers == len(cache.layers)


def test_compiled_blocks_decode_the_same_without_recompiling_per_step():
    """compile_student leaves the cache bookkeeping outside the compiled code, so steps reuse one graph per layer.
    Until session 30 the KV layer's token count, bumped inside the compiled attention, recompiled every softmax
    layer at every step; on a GPU the bench hit Dynamo's recompile limit and ran the later layers eagerly."""
    from torch._dynamo.utils import counters

    from hybrid_distill.distill.compiled_blocks import compile_student

    model = hybrid_with_live_gates([1], "gdn")
    prompt = torch.randint(model.config.vocab_size, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(4))
    expected_tokens, expected_logits = dynamic_greedy(model, prompt, NEW_TOKENS)
    torch._dynamo.reset()
    assert compile_student(model) == 4 * 3 + 1 + 1 + 3   # MLPs and norms, final norm, one attention, three mixers
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, NEW_TOKENS)
    for step in range(NEW_TOKENS):
        decoder.step()
        torch.testing.assert_close(decoder.last_logits, expected_logits[step], rtol=1e-4, atol=1e-4)
        if step == 1:
            graphs_after_two_steps = counters["stats"]["unique_graphs"]
    assert torch.equal(decoder.tokens, expected_tokens)
    assert counters["stats"]["unique_graphs"] == graphs_after_two_steps > 0
    assert [layer.get_seq_length() for layer in decoder.cache.layers] == [PROMPT_LENGTH + NEW_TOKENS] * 4


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_decode_steps_equal_one_forward_over_the_whole_sequence(mixer):
    """The one-token paths (short conv as a weighted sum, fused gate projections, recurrent kernel) compute what
    the sequence paths compute, with live gates: each step's logits equal a full forward's at that position."""
    model = hybrid_with_live_gates([2], mixer)
    prompt = torch.randint(model.config.vocab_size, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(5))
    decoder = StaticGreedyDecoder.after_prefill(model, prompt, NEW_TOKENS)
    step_logits = []
    for _ in range(NEW_TOKENS):
        decoder.step()
        step_logits.append(decoder.last_logits.clone())
    sequence = torch.cat([prompt, decoder.prefill_token, decoder.tokens[:, :-1]], 1)
    with torch.no_grad():
        full = model(input_ids=sequence).logits.float()
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, PROMPT_LENGTH + step], rtol=1e-4, atol=1e-4)
