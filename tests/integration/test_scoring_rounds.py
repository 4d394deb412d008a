"""One scoring job that writes every round's score (runs without the live early stop) against the live rounds,
each of which resumes the previous round's state in a new job: the score files must be the same."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybrid_distill.config.load import validate_config
from hybrid_distill.data.packed import PackedTokens, write_packed
from hybrid_distill.distill.jobs import distill_stage2
from hybrid_distill.distill.objectives import heldout_kl
from hybrid_distill.models.checkpoint import save_hybrid
from hybrid_distill.models.student import build_student, decoder_layers
from hybrid_distill.models.teacher import load_teacher

pytestmark = pytest.mark.integration

SEQ_LEN, MICRO_BATCH, STEPS, EVERY = 16, 2, 5, 2  # rounds end at steps 2, 4 and 5


@pytest.fixture
def scoring_run(tiny_teacher_dir, tmp_path):
    """(config, data dir, stage-1 student dir) of a one-swap scoring run on the tiny teacher."""
    teacher, _ = load_teacher(str(tiny_teacher_dir))
    rng = np.random.default_rng(0)
    vocab = teacher.config.vocab_size
    for split, rows in (("train", 12), ("heldout", 4)):
        write_packed(tmp_path / "data" / f"{split}.bin", rng.integers(0, vocab, (rows, SEQ_LEN)),
                     {"vocab_size": vocab})
    torch.manual_seed(0)
    save_hybrid(build_student(teacher, [], "gdn"), tmp_path / "stage1")
    config = validate_config({
        "run": "rounds", "teacher": {"spec": str(tiny_teacher_dir)},
        "distill": {"kl_chunk_tokens": 24},
        "scoring": {"stage2": {"tokens": STEPS * MICRO_BATCH * SEQ_LEN, "lr": 0.01, "schedule": "cosine",
                               "warmup_steps": 1, "micro_batch_size": MICRO_BATCH, "save_every": 1},
                    "snapshot_every": EVERY, "heldout_sequences": 3}})
    return config, tmp_path / "data", tmp_path / "stage1"


def test_one_job_writes_the_scores_of_the_live_rounds(scoring_run, tiny_teacher_dir, tmp_path):
    config, data, stage1 = scoring_run
    live, single = tmp_path / "live", tmp_path / "single"
    for round_index, stop in enumerate((2, 4, 5)):  # the workflow's live rounds: a new job resumes each
        distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], live / "stage2",
                       stop_after_step=stop, score_path=live / f"round{round_index}.json", save_model=False)
    distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], single / "stage2",
                   save_model=False, rounds_dir=single)

    rounds = [json.loads((live / f"round{r}.json").read_text()) for r in range(3)]
    assert [r["step"] for r in rounds] == [2, 4, 5]
    assert len({r["heldout_kl"] for r in rounds}) == 3  # the snapshots are of a model still training
    assert sorted(p.name for p in single.glob("round*.json")) == ["round0.json", "round1.json", "round2.json"]
    for r, expected in enumerate(rounds):
        assert json.loads((single / f"round{r}.json").read_text()) == expected, f"round {r}"
    assert rounds[-1]["budget_exhausted"]
    assert not (single / "stage2" / "state").exists()


def test_a_rerun_rescores_from_the_start_rather_than_from_a_kept_state(scoring_run, tiny_teacher_dir, tmp_path):
    """A failed attempt's outputs are deleted by Snakemake; its saved state must not make the rerun skip rounds."""
    config, data, stage1 = scoring_run
    out = tmp_path / "single"
    distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], out / "stage2",
                   stop_after_step=4, save_model=False)  # an attempt killed after step 4, its state kept
    assert (out / "stage2" / "state").exists()
    distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], out / "stage2",
                   save_model=False, rounds_dir=out)
    assert [json.loads((out / f"round{r}.json").read_text())["step"] for r in range(3)] == [2, 4, 5]


def test_a_multi_process_launch_is_refused_before_training(scoring_run, tiny_teacher_dir, tmp_path, monkeypatch):
    """Rounds count one process's steps: two processes would end after half of the files Snakemake expects."""
    config, data, stage1 = scoring_run
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="scoring.early_stop.enabled"):
        distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], tmp_path / "out" / "stage2",
                       save_model=False, rounds_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_heldout_kl_leaves_modes_and_trainable_parameters_as_they_were(tiny_teacher_dir, tmp_path):
    teacher, _ = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, [], "gla")
    student.requires_grad_(False)
    decoder_layers(student)[0].self_attn.requires_grad_(True)
    student.train()
    before = {name: p.requires_grad for name, p in student.named_parameters()}
    write_packed(tmp_path / "heldout.bin", np.zeros((2, SEQ_LEN), dtype=np.int64), {"vocab_size": 128})
    kl = heldout_kl(student, teacher, PackedTokens(tmp_path / "heldout.bin"), 2, 2, chunk_tokens=8)
    assert kl > 0
    assert {name: p.requires_grad for name, p in student.named_parameters()} == before
    assert student.training


@pytest.mark.parametrize("memory_budget", [1.0, 0.5])
def test_a_job_with_the_paper_configs_speed_options_resumes_exactly(scoring_run, tiny_teacher_dir, tmp_path,
                                                                     memory_budget):
    """Compiled blocks and KL, bf16 weights with float32 master copies, recomputation and CUDA graphs (the paper
    configs' stage-2 options; on a CPU the graphs' option trains eagerly), also with a partial activation memory
    budget, in a job stopped and resumed: the score equals an uninterrupted job's."""
    config, data, stage1 = scoring_run
    config["distill"].update(compile_blocks=True, compile_kl=True, bf16_weights=True, activation_checkpointing=True,
                             cuda_graphs=True, activation_memory_budget=memory_budget)
    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    for round_index, stop in enumerate((2, 5)):
        distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], resumed / "stage2",
                       stop_after_step=stop, score_path=resumed / f"round{round_index}.json", save_model=False)
    distill_stage2(config, "scoring.stage2", tiny_teacher_dir, data, stage1, [1], whole / "stage2",
                   stop_after_step=5, score_path=whole / "round.json", save_model=False)
    first, last = (json.loads((resumed / f"round{r}.json").read_text()) for r in range(2))
    uninterrupted = json.loads((whole / "round.json").read_text())
    assert (first["step"], last["step"], uninterrupted["step"]) == (2, 5, 5)
    assert first["heldout_kl"] != last["heldout_kl"]
    assert last["heldout_kl"] == uninterrupted["heldout_kl"]
