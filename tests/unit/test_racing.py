"""Racing drops layers ranked far outside the top-K, the same way live and in a replay of a reference run."""
from __future__ import annotations

import json

import pytest

from hybrid_distill.select.racing import racing_settings, run_race
from hybrid_distill.select.rounds import decide_round, selection_cost, summarise_early_stop

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
            "scoring": {"stage2": {"tokens": stage2_tokens}, "snapshots_per_job": 1,
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
            path.parent.mkdir(parents=True, exist_ok=True)
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
    cost = selection_cost(config(racing=True), decisions[-1], num_layers=4, tokens_spent=120, tokens_full_budget=120)
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


def test_racing_drops_layers_only_where_a_live_job_ends():
    # 2 rounds per job: round 1 ends the first job, so nothing is dropped at round 0 even past from_tokens
    race = run_race(KL, TOKENS, keep=2, from_tokens=10, rounds_per_job=2)
    assert [entry.racing for entry in race] == [{0, 1, 2, 3}, {0, 1}, {0, 1}]
    assert run_race(KL, TOKENS, keep=2, from_tokens=10)[0].racing == {0, 1}


def job_file(path, rounds):
    """A live job's score file: its last round's score, and every round it trained in `snapshots`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**rounds[-1], "snapshots": rounds}))
    return path


def test_live_jobs_of_several_rounds_decide_as_one_round_per_job_would(tmp_path):
    """Two rounds per job: the decision after the second job equals the decision every round's files give."""
    cfg = config(racing=True)
    cfg["scoring"]["snapshots_per_job"] = 2
    per_round = write_grid(tmp_path / "rounds", KL, TOKENS)
    score = lambda r, layer: json.loads(per_round[r][layer].read_text())  # noqa: E731
    first = [job_file(tmp_path / "jobs" / f"layer{layer}" / "round1.json", [score(0, layer), score(1, layer)])
             for layer in range(4)]
    # the first job's end drops layers 2 and 3 (20 tokens each); only layers 0 and 1 train round 2
    second = [job_file(tmp_path / "jobs" / f"layer{layer}" / "round2.json", [score(2, layer)]) for layer in (0, 1)]
    live = decide_round(cfg, [first, second + first[2:]], k=1, max_rounds=3, out_json=tmp_path / "live.json")
    replayed = [decide_round(cfg, per_round[:r + 1], k=1, max_rounds=3, out_json=tmp_path / f"r{r}.json")
                for r in range(3)][-1]
    assert live["round"] == 2 and live["history"] == replayed["history"]
    assert live["racing"] == replayed["racing"] == [0, 1] and live["tokens"] == 100
    assert [entry["racing_layers"] for entry in live["history"]] == [4, 2, 2]


def test_a_job_file_missing_one_of_its_rounds_is_named(tmp_path):
    cfg = config(racing=False)
    whole = [job_file(tmp_path / f"layer{layer}" / "round1.json",
                      [{"heldout_kl": 1.0, "tokens": 10, "step": 1}, {"heldout_kl": 0.5, "tokens": 20, "step": 2}])
             for layer in range(2)]
    short = job_file(tmp_path / "layer2" / "round1.json", [{"heldout_kl": 0.5, "tokens": 20, "step": 2}])
    with pytest.raises(ValueError, match="layer2/round1.json holds 1 rounds"):
        decide_round(cfg, [[*whole, short]], k=1, max_rounds=3, out_json=tmp_path / "d.json")


def test_the_rule_stops_a_live_run_at_the_end_of_the_job_in_which_it_fired(tmp_path):
    cfg = config(racing=False)
    cfg["scoring"]["early_stop"].update(enabled=True, window=2, min_mean_jaccard=1.0)
    cfg["scoring"]["snapshots_per_job"] = 2
    stable = [[0.1, 1.0, 2.0, 3.0]] * 4
    files = write_grid(tmp_path, stable, [[10 * (r + 1)] * 4 for r in range(4)])
    decisions = [decide_round(cfg, files[:r + 1], k=1, max_rounds=4, out_json=tmp_path / f"d{r}.json")
                 for r in range(4)]
    assert decisions[1]["fired_round"] == 1 and decisions[1]["stop_round"] == 1 and decisions[1]["stop"]
    cfg["scoring"]["early_stop"]["window"] = 3   # fires at round 2, inside the job of rounds 2-3
    decisions = [decide_round(cfg, files[:r + 1], k=1, max_rounds=4, out_json=tmp_path / f"d{r}.json")
                 for r in range(4)]
    assert [d["stop"] for d in decisions] == [False, False, False, True]
    assert decisions[3]["fired_round"] == 2 and decisions[3]["stop_round"] == 3


def test_each_round_logs_where_the_rule_stands_and_what_comes_next(tmp_path, caplog):
    """Window 2 over K=1 sets {0}, {0}, {3}: round 0 waits for the window, round 1 fires the rule (Jaccard 1.0),
    and with early stop on the pass stops there; with it off it goes on and says so, and early_stop.json's log line
    says what stopping would have changed."""
    import logging

    files = write_grid(tmp_path, KL, TOKENS)
    cfg = config(racing=False)
    cfg["scoring"]["early_stop"].update(enabled=True, window=2)
    with caplog.at_level(logging.INFO, logger="hybrid_distill.select.rounds"):
        for r in range(2):
            decide_round(cfg, files[:r + 1], k=1, max_rounds=3, out_json=tmp_path / f"on{r}.json")
        cfg["scoring"]["early_stop"]["enabled"] = False
        for r in range(3):
            decide_round(cfg, files[:r + 1], k=1, max_rounds=3, out_json=tmp_path / f"off{r}.json")
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("round ")]
    assert lines[0] == ("round 0 (step 1, 40 tokens so far, 4 layers racing): top-1 [0]; 1 of the 2 snapshots the "
                        "rule's window needs -> another round")
    assert lines[1] == ("round 1 (step 2, 80 tokens so far, 4 layers racing): top-1 [0]; last 2 snapshots: mean "
                        "Jaccard 1.00 (needs >= 0.9), backbone 1 (>= 0), union 1 (<= 2) -> stop: the rule fired at "
                        "round 1")
    assert lines[3].endswith("-> another round (the rule fired at round 1; early stop is off)")
    assert lines[4].startswith("round 2 (step 3, 120 tokens so far, 4 layers racing): top-1 [3]; last 2 snapshots: "
                               "mean Jaccard 0.00")
    assert lines[4].endswith("-> stop: the scoring budget is spent (the rule fired at round 1)")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybrid_distill.select.rounds"):
        summarise_early_stop(cfg, [tmp_path / f"off{r}.json" for r in range(3)], files, tokens_full_budget=120,
                             out_json=tmp_path / "early_stop.json")
    # the paper protocol: 4 layers x (5 + 100) tokens; to the stop: stage 1 (5) + round 1's 80 stage-2 tokens
    assert caplog.records[-1].getMessage() == (
        "selection pass: top-1 [3] after round 2; the rule fired at round 1 (step 2); 85 tokens to stop, 20.2% of "
        "the paper protocol's 420; at the stop [0], at the full budget [3]: 1 swap(s)")
