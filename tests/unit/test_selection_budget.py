"""The selection pass's cost before a run: the bounds must be what runs then spend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_distill.config.load import load_config
from hybrid_distill.select.budget import format_budget, job_ends, selection_budget

REPO = Path(__file__).resolve().parents[2]


def test_job_ends_cover_every_round_and_the_last_job_may_be_shorter():
    assert job_ends(32, 8) == [7, 15, 23, 31]
    assert job_ends(32, 5) == [4, 9, 14, 19, 24, 29, 31]
    assert job_ends(3, 1) == [0, 1, 2]


def test_the_live_racing_run_spent_its_never_fires_bound_which_it_reached():
    """The H200 run's rule fired inside its last job, so it spent the 'never fires' bound, token for token."""
    results = REPO / "docs" / "results" / "racing_live_h200"
    budget = selection_budget(load_config(results / "config.yaml"), num_layers=30)
    recorded = json.loads((results / "early_stop.json").read_text())
    assert budget.never.tokens == recorded["selection_cost"]["tokens_to_stop"] == 9_699_328
    assert budget.never.stop_round == recorded["stopped_at_round"] == 31
    trained_on = [json.loads((results / "decisions" / f"round{end}.json").read_text())["racing"] for end in (7, 15, 23)]
    assert budget.never.jobs == 30 + sum(len(racing) for racing in trained_on) == 66  # the jobs the run scheduled
    assert budget.racing_keep == 12 and budget.racing_from_step == 16
    # first chance: a full window of 10 snapshots at round 9, inside the job that ends at round 15 (step 32)
    assert (budget.earliest.stop_step, budget.earliest.jobs) == (32, 42)
    assert budget.earliest.stage2_tokens == (30 * 16 + 12 * 16) * 8192
    assert budget.unraced.tokens == recorded["selection_cost"]["no_early_stop_tokens"] == 16_777_216
    assert budget.unraced.jobs == 30
    assert budget.paper_protocol_tokens == recorded["selection_cost"]["paper_protocol_tokens"]


def test_the_paper_config_with_racing_costs_about_four_percent_at_most():
    config = load_config(REPO / "configs" / "paper-qwen2.5-3b.yaml")
    assert selection_budget(config, 36).never.fraction_of_paper == pytest.approx(1_899_553_024 / 25.2e9)
    config["scoring"]["racing"]["enabled"] = True
    budget = selection_budget(config, 36)
    assert budget.k == 4 and budget.racing_keep == 12
    # its jobs of 5 rounds (250 steps): racing starts at the job end after 12.5M tokens (763 steps), step 1000
    assert budget.racing_from_step == 1000
    assert budget.never.stage2_tokens == (36 * 1000 + 12 * 2051) * 16384
    assert f"{budget.never.fraction_of_paper:.1%}" == "4.3%"
    assert "| live: the rule never fires | step 3051 |" in format_budget(budget, "paper")
    config["scoring"]["snapshots_per_job"] = 1   # a job per round: racing starts at step 800
    budget = selection_budget(config, 36)
    assert budget.racing_from_step == 800 and f"{budget.never.fraction_of_paper:.1%}" == "4.0%"


def test_racing_that_keeps_every_layer_drops_none():
    config = load_config(REPO / "configs" / "smollm2-racing-live.yaml")
    config["scoring"]["racing"]["keep_factor"] = 8   # 32 >= 30 layers
    budget = selection_budget(config, 30)
    assert budget.racing_keep is None and budget.never.stage2_tokens == 30 * 64 * 8192


def test_plan_selection_prints_the_bounds_for_a_config_and_names_a_missing_one(capsys, tmp_path):
    from hybrid_distill.cli import main

    assert main(["plan-selection", "--config", str(REPO / "configs" / "smollm2-racing-live.yaml")]) == 0
    out = capsys.readouterr().out
    assert "| live: the rule never fires | step 64 | 66 | 8,650,752 | 9,699,328 | 20.6% |" in out
    assert "racing: after the job ending at step 16, the best 12 layers race on" in out
    assert main(["plan-selection", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
