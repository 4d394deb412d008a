"""On CUDA, a training job with distill.cuda_graphs logs the same losses, learning rates and gradient norms as the
eager job and ends with the same weights, also when it resumes a state an eager job saved (the learning rate
must then move from the saved float into the tensor the graph reads, or the schedule would stop)."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill.objectives import HiddenAlignment, LogitDistillation
from hybrid_distill.distill.trainer import GRAPH_WARMUP_STEPS, TrainSettings, train
from hybrid_distill.models.student import build_student

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]
SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
STEPS = 6


class Tokens:
    num_sequences, seq_len = 64, 256

    def __init__(self):
        self.rows = torch.randint(0, SHAPE["vocab_size"], (self.num_sequences, self.seq_len),
                                  generator=torch.Generator().manual_seed(0))

    def batch(self, first, size):
        return self.rows[(first + torch.arange(size)) % self.num_sequences]


def job(out, stage: str, cuda_graphs: bool, teacher_ahead: bool = False, **kwargs):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().requires_grad_(False)
    student = build_student(teacher, [1], "gdn")
    if stage == "stage1":  # per-layer clipping, only mixers train
        objective = HiddenAlignment(student, teacher)
        kwargs["clip_groups"] = objective.clip_groups()
    else:
        objective = LogitDistillation(student, teacher, 1.0, 512, teacher_ahead=teacher_ahead)
    settings = TrainSettings(token_budget=STEPS * 4 * 2 * Tokens.seq_len, micro_batch_size=4, grad_accum=2,
                             lr=1e-3, warmup_steps=2, schedule="cosine", save_every=2)
    return train(objective, Tokens(), settings, out, description="graphs", cuda_graphs=cuda_graphs, **kwargs)


def saved_lr(result) -> float:
    """The learning rate in the optimizer state the job saved after its last step (a tensor when graphed)."""
    state = torch.load(result.state_dir / "optimizer.bin", weights_only=True, map_location="cpu")
    return float(state["param_groups"][0]["lr"])


def lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_job(graphed_out, graphed, eager_out, eager):
    graphed_lines, eager_lines = lines(graphed_out), lines(eager_out)
    assert [line["step"] for line in graphed_lines] == list(range(1, STEPS + 1))
    # the rate the replays read moved on with the schedule after the capture (cosine: every step differs)
    assert saved_lr(graphed) == pytest.approx(saved_lr(eager), rel=1e-6)
    assert saved_lr(graphed) != pytest.approx(graphed_lines[GRAPH_WARMUP_STEPS]["lr"], rel=1e-3)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([line[key] for line in graphed_lines], [line[key] for line in eager_lines],
                                   rtol=2e-3, atol=0, msg=key)
    for (name, weight), (_, reference) in zip(graphed.objective.student.named_parameters(),
                                              eager.objective.student.named_parameters()):
        torch.testing.assert_close(weight, reference, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.usefixtures("one_short_conv")
def test_a_graphed_job_trains_as_the_eager_job_and_resumes_an_eager_state(stage, tmp_path, monkeypatch):
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    eager = job(tmp_path / "eager", stage, cuda_graphs=False)
    assert not replays
    graphed = job(tmp_path / "graphed", stage, cuda_graphs=True)
    assert len(replays) == STEPS - GRAPH_WARMUP_STEPS  # every step after the warm-up was a replay
    assert_same_job(tmp_path / "graphed", graphed, tmp_path / "eager", eager)

    job(tmp_path / "resumed", stage, cuda_graphs=False, stop_after_step=2)
    replays.clear()
    resumed = job(tmp_path / "resumed", stage, cuda_graphs=True)
    assert resumed.resumed and resumed.step == STEPS
    assert len(replays) == STEPS - 2 - GRAPH_WARMUP_STEPS
    assert_same_job(tmp_path / "resumed", resumed, tmp_path / "eager", eager)


@pytest.mark.parametrize("priority", ["low", "equal"])
@pytest.mark.usefixtures("one_short_conv")
def test_a_job_with_the_teacher_ahead_trains_as_the_job_with_the_teacher_in_line(priority, tmp_path, monkeypatch):
    """distill.teacher_ahead, eager (its check of the rows runs at every micro-step) and graphed (the replays run the
    teacher on a side stream at each priority), against the eager job with the teacher in line."""
    from hybrid_distill.distill.teacher_ahead import PRIORITY_SWITCH

    monkeypatch.setenv(PRIORITY_SWITCH, priority)
    in_line = job(tmp_path / "in_line", "stage2", cuda_graphs=False)
    for cuda_graphs in (False, True):
        out = tmp_path / f"ahead_{cuda_graphs}"
        ahead = job(out, "stage2", cuda_graphs=cuda_graphs, teacher_ahead=True)
        torch.cuda.synchronize()  # a failed check of the rows surfaces here
        assert ahead.objective.teacher_ahead.stream is not None
        assert_same_job(out, ahead, tmp_path / "in_line", in_line)


@pytest.mark.usefixtures("one_short_conv")
def test_a_graphed_job_on_a_partial_teacher_cache_trains_as_the_eager_job(tmp_path, monkeypatch):
    """Steps whose rows the cache holds and steps that run the live teacher are two graphs; each replay copies its
    step's cached rows in. 8 steps of 8 rows over 64 rows, the cache holding the first 40: steps 1-5 cached, 6-8
    live, so each kind warms up (2 steps), is captured, and replays its later steps."""
    from hybrid_distill.data.packed import PackedTokens, write_packed
    from hybrid_distill.distill.teacher_cache import TeacherCache, write_teacher_cache

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SHAPE)).cuda().eval().requires_grad_(False)
    write_packed(tmp_path / "train.bin", Tokens().rows.numpy(), {"vocab_size": SHAPE["vocab_size"]})
    data = PackedTokens(tmp_path / "train.bin")
    identity = {"teacher_fingerprint": "test", "data_sha256": data.meta["sha256"], "seq_len": data.seq_len,
                "hidden_size": SHAPE["hidden_size"]}
    write_teacher_cache(teacher, data, 40, 8, tmp_path / "hidden.bin", autocast_dtype=torch.bfloat16,
                        identity=identity)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    results, logged = {}, {}
    for name, cuda_graphs in (("eager", False), ("graphed", True)):
        torch.manual_seed(0)
        cache = TeacherCache(tmp_path / "hidden.bin", identity)
        objective = LogitDistillation(build_student(teacher, [1], "gdn"), teacher, 1.0, 512, teacher_cache=cache)
        settings = TrainSettings(token_budget=8 * 8 * data.seq_len, micro_batch_size=8, lr=1e-3,
                                 schedule="constant", save_every=8)
        results[name] = train(objective, data, settings, tmp_path / name, description=name, cuda_graphs=cuda_graphs)
        logged[name] = lines(tmp_path / name)
        # replayed: cached steps 3-5 and live step 8 (a capture's own step replays too)
        assert len(replays) == (0 if name == "eager" else 3 + 1)
    assert [line["teacher_cached"] for line in logged["graphed"]] == [1.0] * 5 + [0.0] * 3
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([line[key] for line in logged["graphed"]], [line[key] for line in logged["eager"]],
                                   rtol=2e-3, atol=0, msg=key)
    for (name, weight), (_, reference) in zip(results["graphed"].objective.student.named_parameters(),
                                              results["eager"].objective.student.named_parameters()):
        torch.testing.assert_close(weight, reference, rtol=2e-2, atol=2e-3, msg=name)
