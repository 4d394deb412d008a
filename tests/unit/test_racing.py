"""Racing drops layers ranked far outside the top-K, the same way live and in a replay of a reference run."""
from __future__ import annotations

import json

import pytest

from hybrid_distill.select.racing import racing_settings, run_race
from hybrid_distill.select.rounds import decide_round, selection_cost

# 4 layers, 3 rounds of 10 tokens per layer. Layer 3 starts worst and would end best if it kept training.
KL = [[1.0, 2.0, 3.0, 4.0],
      [0.9, 1.8, 2.9, 3.5],
      [0.8, 1.7, 2.8, 0.1]]
TOKENS = [[10] * 4, [20] * 4, [30] * 4]


def test_without_racing_every_layer_trains_every_round():
    race = run_race(KL, TOKENS, keep=None, from_tokens=0)
    assert [entry.kl for entry in race] == KL
    assert [entry.tokens for entry in race] == [40, 80, 120]
    assert all(entry.racing == {0, 1, 2, 3} for entry in race)


def test_dropped_layers_keep_their_last_score_and_tokens():
    race = run_race(KL, TOKENS, keep=2, from_tokens=20)
    assert race[0].racing == {0, 1, 2, 3}              # 10 tokens each: before from_tokens nothing is dropped
    assert race[1].racing == {0, 1}                    # at 20 tokens the two worst-ranked leave
    assert race[2].kl == [0.8, 1.7, 2.9, 3.5]          # layer 3's later 0.1 was never trained for
    assert race[2].tokens == 30 + 30 + 20 + 20


def test_a_live_grid_that_repeats_dropped_layers_races_the_same():
    live_kl = [KL[0], KL[1], [0.8, 1.7, 2.9, 3.5]]
    live_tokens = [TOKENS[0], TOKENS[1], [30, 30, 20, 20]]
    assert run_race(live_kl, live_tokens, 2, 20) == run_race(KL, TOKENS, 2, 20)


def test_keep_must_be_at_least_one_layer():
    with pytest.raises(ValueError, match="keep"):
        run_race(KL, TOKENS, keep=0, from_tokens=0)


def config(racing: bool, stage2_tokens: int = 40) -> dict:
    return {"distill": {"stage1": {"tokens": 5}, "stage2": {"tokens": 100}},
            "scoring": {"stage2": {"tokens": stage2_tokens},
                        "racing": {"enabled": racing, "from_fraction": 0.5, "keep_factor": 2},
                        "early_stop": {"enabled": False, "window": 10, "min_mean_jaccard": 0.9,
                                       "min_backbone": None, "max_union": None}}}


def test_racing_settings_scale_keep_with_k_and_read_the_fraction_of_the_scoring_budget():
    assert racing_settings(config(racing=True), k=1) == (2, 20)
    assert racing_settings(config(racing=False), k=1) == (None, 0)


def write_grid(tmp_path, kl, tokens):
    files = []
    for r, (kl_row, token_row) in enumerate(zip(kl, tokens)):
        row = []
        for layer, (value, spent) in enumerate(zip(kl_row, token_row)):
            path = tmp_path / f"layer{layer}" / f"round{r}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"heldout_kl": value, "tokens": spent, "step": spent // 10}))
            row.append(path)
        files.append(row)
    return files


def test_a_reference_run_replays_the_race_in_its_decisions_and_reports_the_true_full_budget_set(tmp_path):
    files = write_grid(tmp_path, KL, TOKENS)
    decisions = [decide_round(config(racing=True), files[:r + 1], k=1, max_rounds=3, out_json=tmp_path / f"d{r}.json")
                 for r in range(3)]
    assert [d["racing"] for d in decisions] == [[0, 1, 2, 3], [0, 1], [0, 1]]
    assert [d["tokens"] for d in decisions] == [40, 80, 100]
    assert decisions[-1]["top_k"] == [0]               # layer 3 raced out at 3.5
    assert decisions[-1]["top_k_as_scored"] == [3]     # the reference run trained it on to 0.1
    cost = selection_cost(config(racing=True), decisions, num_layers=4, tokens_spent=120, tokens_full_budget=120)
    assert cost["tokens_to_stop"] == 5 + 100
    assert cost["top_k_at_stop"] == [0] and cost["top_k_full_budget"] == [3] and cost["swaps_between"] == 1


def test_replaying_the_same_set_run_reproduces_its_device_decisions(tmp_path):
    """scripts/replay_selection.py on the committed H200 reference run gives the early_stop.json the run wrote."""
    import subprocess
    import sys
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "docs" / "results" / "same_set_h200"
    subprocess.run([sys.executable, str(results.parents[2] / "scripts" / "replay_selection.py"),
                    "--round-scores", str(results / "round_scores.csv"), "--tokens-per-step", "8192",
                    "--config", str(results / "config.yaml"), "--out", str(tmp_path)], check=True, capture_output=True)
    replayed = json.loads((tmp_path / "early_stop.json").read_text())
    recorded = json.loads((results / "early_stop.json").read_text())
    assert [r["top_k"] for r in replayed["rounds"]] == [r["top_k"] for r in recorded["rounds"]]
    assert replayed["fired_round"] == recorded["fired_round"] == 27
    assert replayed["selection_cost"] == recorded["selection_cost"]
