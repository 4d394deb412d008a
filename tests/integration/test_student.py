"""Students built from tiny random Llama/Qwen2 teachers: exactness of transfer, cache and checkpoints."""
import pytest
import torch

from hybrid_distill.models.checkpoint import CheckpointError, load_hybrid, save_hybrid
from hybrid_distill.models.mixers import LinearMixer
from hybrid_distill.models.student import (
    build_student, decoder_layers, mixers_of, restore_softmax_layers, softmax_layers_of,
)

pytestmark = pytest.mark.integration
MIXERS = ["gdn", "gla"]


def tokens(batch=2, length=40, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_all_softmax_student_is_the_teacher(teacher):
    student = build_student(teacher, range(4), "gdn")
    x = tokens()
    assert not mixers_of(student)
    assert (student(x).logits - teacher(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("mixer", MIXERS)
def test_restored_layer_holds_teacher_weights_bit_for_bit(teacher, mixer):
    student = build_student(teacher, [], mixer)
    restore_softmax_layers(student, teacher, [2])
    assert softmax_layers_of(student) == [2]
    teacher_attn = decoder_layers(teacher)[2].self_attn.state_dict()
    student_attn = decoder_layers(student)[2].self_attn.state_dict()
    assert teacher_attn.keys() == student_attn.keys()
    assert all(torch.equal(teacher_attn[k], student_attn[k]) for k in teacher_attn)
    assert student.config.hybrid["softmax_layers"] == [2]


@pytest.mark.parametrize("mixer", MIXERS)
def test_linear_layers_start_from_transferred_teacher_projections(teacher, mixer):
    student = build_student(teacher, [0], mixer)
    config = teacher.config
    groups = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    for i, mixer_module in mixers_of(student).items():
        attention = decoder_layers(teacher)[i].self_attn
        assert torch.equal(mixer_module.q_proj.weight, attention.q_proj.weight)
        assert torch.equal(mixer_module.o_proj.weight, attention.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            source = getattr(attention, name).weight.reshape(config.num_key_value_heads, head_dim, -1)
            target = getattr(mixer_module, name).weight.reshape(config.num_attention_heads, head_dim, -1)
            for head in range(config.num_attention_heads):  # query head h reads KV head h // groups, as repeat_kv
                assert torch.equal(target[head], source[head // groups])
        if config.model_type == "qwen2":
            assert torch.equal(mixer_module.q_proj.bias, attention.q_proj.bias)
            assert torch.equal(mixer_module.k_proj.bias.reshape(-1, head_dim)[groups],
                               attention.k_proj.bias.reshape(-1, head_dim)[1])
    assert isinstance(decoder_layers(student)[1].self_attn, LinearMixer)
    assert torch.equal(decoder_layers(student)[1].mlp.up_proj.weight, decoder_layers(teacher)[1].mlp.up_proj.weight)


def test_linear_student_differs_from_teacher(teacher):
    """Guards the two exactness tests above against a student that silently kept softmax everywhere."""
    student = build_student(teacher, [], "gdn")
    x = tokens()
    assert (student(x).logits - teacher(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_generation_equals_full_recompute(teacher, mixer):
    student = build_student(teacher, [1], mixer).eval()
    prompt = tokens(1, 12)
    cached = student.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
    recomputed = student.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("mixer", MIXERS)
def test_left_padded_batch_generates_like_single_prompts(teacher, mixer):
    student = build_student(teacher, [1], mixer).eval()
    short, long = tokens(1, 7, seed=3), tokens(1, 12, seed=4)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1), torch.ones(1, 12)]).long()
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, suppress_tokens=[0])  # 0 only ever pads
    together = student.generate(batch, attention_mask=mask, **options)
    alone = [student.generate(p, attention_mask=torch.ones_like(p), **options) for p in (short, long)]
    assert torch.equal(together[0, 5:], alone[0][0])
    assert torch.equal(together[1], alone[1][0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_checkpoint_round_trip(teacher, mixer, tmp_path):
    student = build_student(teacher, [0, 3], mixer)
    x = tokens()
    save_hybrid(student, tmp_path / "hybrid")
    loaded = load_hybrid(tmp_path / "hybrid")
    assert loaded.config.hybrid["softmax_layers"] == [0, 3]
    assert loaded.config.hybrid["mixer"]["kind"] == mixer
    assert torch.equal(loaded(x).logits, student.eval()(x).logits)
    assert not list(tmp_path.glob(".*tmp*"))


def test_truncated_checkpoint_is_refused(teacher, tmp_path):
    save_hybrid(build_student(teacher, [0], "gdn"), tmp_path / "hybrid")
    weights = tmp_path / "hybrid" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hybrid(tmp_path / "hybrid")


def test_layer_index_out_of_range_is_named(teacher):
    with pytest.raises(ValueError, match="layer index 7 is out of range"):
        build_student(teacher, [0, 7], "gdn")


def test_unknown_mixer_is_named(teacher):
    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        build_student(teacher, [0], "mamba")
