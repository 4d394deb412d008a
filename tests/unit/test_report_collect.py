"""Input checks: a malformed or inconsistent input file is a ValueError that names the file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hybrid_distill.report.collect import (
    load_early_stop, load_efficiency, load_evaluations, load_importance, load_selections,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "report"
GOOD_EVAL = {"model": "ga_s2_K4", "kind": "hybrid", "selector": "ga_s2", "k": 4, "ratio": 0.5, "mixer": "gdn",
             "softmax_layers": [0, 1, 5, 6], "scores": {"niah_single@512": 0.9, "heldout_ppl": 10.4}}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def raises_naming(path: Path, detail: str = ""):
    return pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(detail))


def test_fixture_evaluations_load_with_seeds_and_ratios():
    frame = load_evaluations(sorted((DATA / "evaluations").glob("*.json")))
    models = frame.drop_duplicates("model").set_index("model")
    assert len(models) == 10 and set(frame["score"]) == {"niah_single@512", "kv_retrieval@512", "heldout_ppl"}
    assert models.loc["random_s1_K4", "seed"] == 1 and models.loc["random_s1_K4", "k"] == 4
    assert models.loc["ga_s2_K2", "ratio"] == 0.25 and models.loc["ga_s2_K2", "softmax_layers"] == (1, 5)
    assert models.loc["teacher", "selector"] == "teacher"


@pytest.mark.parametrize(("content", "detail"), [
    ('{"model": "ga_s2_K4", ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({**GOOD_EVAL, "kind": "student"}, "'kind' must be one of"),
    ({key: value for key, value in GOOD_EVAL.items() if key != "scores"}, "missing key 'scores'"),
    ({**GOOD_EVAL, "k": "4"}, "'k' must be a positive integer"),
    ({**GOOD_EVAL, "ratio": 1.5}, "'ratio' must be null or a number in (0, 1]"),
    ({**GOOD_EVAL, "softmax_layers": [0, "1"]}, "'softmax_layers' must be a list of layer indices"),
    ({**GOOD_EVAL, "scores": {"niah_single@512": "high"}}, "scores['niah_single@512'] must be a number"),
    ({**GOOD_EVAL, "scores": {}}, "'scores' must be a non-empty object"),
])
def test_malformed_evaluation_names_the_file(tmp_path, content, detail):
    path = write(tmp_path / "bad.json", content)
    with raises_naming(path, detail):
        load_evaluations([path])


def test_missing_file_names_the_file(tmp_path):
    with raises_naming(tmp_path / "absent.json", "cannot be read"):
        load_evaluations([tmp_path / "absent.json"])


def test_no_evaluations_is_an_error():
    with pytest.raises(ValueError, match="no evaluation JSONs"):
        load_evaluations([])


def test_null_and_non_finite_scores_become_missing(tmp_path):
    path = write(tmp_path / "nan.json", json.dumps({**GOOD_EVAL, "scores": {"a": None, "b": float("nan")}}))
    assert load_evaluations([path])["value"].isna().all()


def test_the_same_model_twice_names_both_files(tmp_path):
    first = write(tmp_path / "one.json", GOOD_EVAL)
    second = write(tmp_path / "two.json", GOOD_EVAL)
    with pytest.raises(ValueError, match=f"{re.escape(str(second))}.*also evaluated in {re.escape(str(first))}"):
        load_evaluations([first, second])


def test_one_selector_with_two_ks_at_one_ratio_is_an_error(tmp_path):
    first = write(tmp_path / "one.json", GOOD_EVAL)
    second = write(tmp_path / "two.json", {**GOOD_EVAL, "model": "ga_s2_K3", "k": 3})
    with raises_naming(second, "has K=3 at ratio 0.5, but K=4"):
        load_evaluations([first, second])


def test_malformed_efficiency_names_file_and_row(tmp_path):
    path = write(tmp_path / "eff.json", {"model": "teacher", "kind": "teacher", "k": None,
                                         "rows": [{"context": 512, "batch": 1, "prefill_s": 0.1}]})
    with raises_naming(path, "rows[0]: missing key 'decode_tok_s'"):
        load_efficiency([path])


def test_unknown_decode_loop_names_file_and_row(tmp_path):
    row = {"context": 512, "batch": 1, "prefill_s": 0.1, "decode_tok_s": 9.0, "cache_bytes": 1, "peak_mem_bytes": None}
    path = write(tmp_path / "eff.json", {"model": "teacher", "kind": "teacher", "k": None,
                                         "rows": [{**row, "decode": "graph"}]})
    with raises_naming(path, "rows[0]: 'decode'"):
        load_efficiency([path])


def test_efficiency_fixture_loads_with_null_peak_memory():
    frame = load_efficiency(sorted((DATA / "efficiency").glob("*.json")))
    assert len(frame) == 4 * 3 * 2 and frame["peak_mem_bytes"].isna().all()


def test_importance_csv_needs_its_columns(tmp_path):
    path = write(tmp_path / "importance.csv", "layer,importance\n0,-0.5\n")
    with raises_naming(path, "missing column(s) heldout_kl, rank"):
        load_importance(path)
    assert list(load_importance(DATA / "importance.csv")["layer"]) == list(range(8))


def test_selection_layer_count_must_match_k(tmp_path):
    path = write(tmp_path / "sel.json", {"selector": "ga_s2", "k": 4, "softmax_layers": [0, 1, 5]})
    with raises_naming(path, "3 distinct layers but k is 4"):
        load_selections([path])


def test_early_stop_that_fired_needs_its_round(tmp_path):
    data = json.loads((DATA / "early_stop.json").read_text())
    trace = load_early_stop(DATA / "early_stop.json")
    assert trace["rounds"]["mean_jaccard"].isna().sum() == 2 and trace["fired_round"] == 5
    path = write(tmp_path / "early_stop.json", {**data, "fired_round": None})
    with raises_naming(path, "'fired_round' must be an integer"):
        load_early_stop(path)
    path = write(tmp_path / "early_stop.json", {**data, "rounds": [{"round": 0, "step": 2}]})
    with raises_naming(path, "rounds[0]: missing key 'top_k'"):
        load_early_stop(path)


def test_workflow_extras_are_accepted(tmp_path):
    """Keys the workflow adds (num_layers, seed, importance) and an empty heldout_kl column are not errors."""
    path = write(tmp_path / "eval.json", {**GOOD_EVAL, "ratio": None, "num_layers": 16, "model": "random_seed3_K4",
                                          "selector": "random"})
    frame = load_evaluations([path])
    assert frame["ratio"].iloc[0] == 0.25 and frame["seed"].iloc[0] == 3
    csv_path = write(tmp_path / "importance.csv", "layer,importance,heldout_kl,rank\n0,-0.5,,2\n1,-0.25,,1\n")
    assert load_importance(csv_path)["heldout_kl"].isna().all()
    seeds = [write(tmp_path / f"random_seed{seed}_K2.json",
                   {"selector": "random", "k": 2, "seed": seed, "softmax_layers": [seed, 7], "importance": None})
             for seed in (0, 1)]
    assert list(load_selections(seeds)["seed"]) == [0, 1]


def test_the_same_model_name_under_two_mixers_is_fine_but_not_twice_under_one(tmp_path):
    gdn = write(tmp_path / "gdn.json", GOOD_EVAL)
    gla = write(tmp_path / "gla.json", {**GOOD_EVAL, "mixer": "gla"})
    assert set(load_evaluations([gdn, gla])["mixer"]) == {"gdn", "gla"}
    again = write(tmp_path / "again.json", GOOD_EVAL)
    with raises_naming(again, "model 'ga_s2_K4' (mixer 'gdn') is also evaluated in"):
        load_evaluations([gdn, gla, again])
