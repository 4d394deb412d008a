"""The selection pass's token bill against the paper's protocol, and the top-K sets at the stop and at the end."""
from __future__ import annotations

import pytest

from hybrid_distill.select.rounds import selection_cost


def config(enabled: bool, stage1_tokens: int = 1000, stage2_tokens: int = 50_000) -> dict:
    return {"distill": {"stage1": {"tokens": stage1_tokens}, "stage2": {"tokens": stage2_tokens}},
            "scoring": {"early_stop": {"enabled": enabled}}}


def decisions(top_ks: list[list[int]], fired_round: int | None, steps_per_round: int = 10,
              stop_round: int | None = None) -> dict:
    """The last decision of 4 layers training 100 tokens per step, no racing; its history holds every round."""
    history = [{"round": r, "step": (r + 1) * steps_per_round, "top_k": top_k,
                "tokens": 4 * (r + 1) * steps_per_round * 100} for r, top_k in enumerate(top_ks)]
    return {"round": len(top_ks) - 1, "top_k_as_scored": top_ks[-1], "fired": fired_round is not None,
            "fired_round": fired_round, "stop_round": fired_round if stop_round is None else stop_round,
            "history": history}


def test_rule_off_counts_tokens_up_to_where_it_would_have_fired_and_keeps_both_sets():
    # 4 layers, 5 rounds of 10 steps x 100 tokens each: the full budget is 4 x 50 x 100 = 20,000 tokens.
    rounds = decisions([[0, 1], [0, 2], [0, 2], [0, 2], [0, 3]], fired_round=2)
    cost = selection_cost(config(enabled=False), rounds, num_layers=4, tokens_spent=20_000, tokens_full_budget=20_000)
    assert cost["stop_round"] == 2
    assert cost["stage2_tokens_to_stop"] == 12_000          # 3 of 5 rounds, every layer
    assert cost["tokens_to_stop"] == 1000 + 12_000          # one shared stage 1
    assert cost["paper_protocol_tokens"] == 4 * (1000 + 50_000)   # every layer: full stage 1 + full stage 2
    assert cost["no_early_stop_tokens"] == 1000 + 20_000
    assert cost["fraction_of_paper"] == pytest.approx(13_000 / 204_000)
    assert cost["top_k_at_stop"] == [0, 2] and cost["top_k_full_budget"] == [0, 3]
    assert cost["swaps_between"] == 1


def test_rule_on_and_fired_has_no_full_budget_set():
    rounds = decisions([[0, 1], [0, 1]], fired_round=1)
    cost = selection_cost(config(enabled=True), rounds, num_layers=4, tokens_spent=8_000, tokens_full_budget=20_000)
    assert cost["tokens_to_stop"] == 1000 + 8_000
    assert cost["top_k_at_stop"] == [0, 1]
    assert cost["top_k_full_budget"] is None and cost["swaps_between"] is None


def test_rule_never_fired_stops_at_the_last_round_with_the_same_set():
    rounds = decisions([[0, 1], [2, 3], [1, 2]], fired_round=None)
    cost = selection_cost(config(enabled=True), rounds, num_layers=4, tokens_spent=12_000, tokens_full_budget=12_000)
    assert cost["stop_round"] == 2 and cost["stage2_tokens_to_stop"] == 12_000
    assert cost["top_k_full_budget"] == cost["top_k_at_stop"] == [1, 2] and cost["swaps_between"] == 0


def test_a_rule_that_fires_inside_a_live_job_counts_the_tokens_and_set_to_that_job_s_end():
    # snapshots_per_job = 2: the rule fires at round 2, the job that scored it ends at round 3
    rounds = decisions([[0, 1], [0, 2], [0, 2], [0, 3], [0, 3]], fired_round=2, stop_round=3)
    cost = selection_cost(config(enabled=False), rounds, num_layers=4, tokens_spent=20_000, tokens_full_budget=20_000)
    assert cost["stop_round"] == 3 and cost["stage2_tokens_to_stop"] == 16_000
    assert cost["top_k_at_stop"] == [0, 3] and cost["swaps_between"] == 0
