"""How lm-eval results become the report's scores, and what makes them plain JSON."""
import json
import math

import pytest
import torch

from hybrid_distill.evaluate.run_eval import collect_scores, json_safe, main_metric, recall_score_name


def test_recall_names_map_to_task_at_length():
    assert recall_score_name("hd_niah_single_512") == "niah_single@512"
    assert recall_score_name("hd_variable_tracking_1024") == "variable_tracking@1024"
    assert recall_score_name("hd_recall") is None
    assert recall_score_name("hd_not_a_task_512") is None
    assert recall_score_name("arc_easy") is None


def test_main_metric_prefers_acc_norm_then_acc_then_the_first_number():
    assert main_metric({"alias": "piqa", "acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.72}) == 0.72
    assert main_metric({"alias": "x", "acc_stderr,none": 0.01, "acc,none": 0.6}) == 0.6
    assert main_metric({"alias": "swde", "contains,none": 0.4, "contains_stderr,none": 0.02}) == 0.4
    assert main_metric({"alias": "y", "sample_len": 10}) is None


def test_collect_scores_reads_recall_other_tasks_and_groups():
    output = {
        "results": {
            "hd_niah_single_512": {"alias": "a", "string_match_all,none": 0.5, "string_match_part,none": 0.9},
            "arc_easy": {"alias": "arc", "acc,none": 0.61, "acc_norm,none": 0.55},
            "sub_a": {"alias": "s", "exact_match,none": 0.2},
            "sub_b": {"alias": "t", "exact_match,none": float("nan")},
            "group_without_row": {"alias": "g"},
        },
        "group_subtasks": {"group_without_row": ["sub_a", "sub_b"]},
    }
    scores = collect_scores(output, ["hd_niah_single_512", "arc_easy", "group_without_row", "missing"])
    assert scores == {"niah_single@512": 0.5, "arc_easy": 0.55, "sub_a": 0.2, "sub_b": None, "missing": None}


def test_json_safe_output_is_strict_json():
    value = {"nan": float("nan"), "inf": -math.inf, "tensor": torch.tensor(3.5), "dtype": torch.bfloat16,
             "nested": [(1, 2.0)], 3: object}
    safe = json_safe(value)
    json.dumps(safe, allow_nan=False)
    assert safe["nan"] is None and safe["inf"] is None and safe["tensor"] == pytest.approx(3.5)
    assert safe["dtype"] == "torch.bfloat16" and safe["nested"] == [[1, 2.0]] and isinstance(safe["3"], str)
