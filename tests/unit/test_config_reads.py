"""Each job reads a slice of the run config (config/reads.py): what a slice holds decides which jobs rerun after a
config edit, and a step that reads outside its slice must fail loudly rather than depend on an untracked value."""
from __future__ import annotations

import copy

import pytest
import yaml

from hybrid_distill.config.load import load_config, validate_config
from hybrid_distill.config.reads import SLICES, UnreadKey, config_slice, slice_file_content

TRAINING_SLICES = ("data", "teacher-cache", "stage1", "stage2", "scoring", "rounds")


def edited(**changes) -> tuple[dict, dict]:
    """A default config and a copy with dotted keys changed."""
    before = validate_config({})
    after = copy.deepcopy(before)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = after
        for key in parents:
            node = node[key]
        node[leaf] = value
    return before, after


def changed_slices(before: dict, after: dict) -> set[str]:
    return {name for name in SLICES if config_slice(before, name) != config_slice(after, name)}


def test_every_slice_names_keys_the_schema_has():
    config = validate_config({})
    for name in SLICES:
        assert config_slice(config, name), name  # a misspelt path raises KeyError here


def test_a_new_selector_or_seed_changes_no_slice():
    assert changed_slices(*edited(**{"selection.selectors": ["ga_s2", "uniform", "random", "act_mse"],
                                     "selection.random_seeds": [0, 1, 2, 3], "selection.ks": [2, 5]})) == set()


def test_a_new_evaluation_task_changes_only_the_evaluation_slices():
    assert changed_slices(*edited(**{"evaluate.recall_tasks": ["niah_single", "kv_retrieval"]})) == {
        "evaluate", "recall-data"}
    assert changed_slices(*edited(**{"evaluate.efficiency_contexts": [512]})) == {"efficiency"}


def test_a_stage2_setting_leaves_stage1_and_the_data_alone():
    assert changed_slices(*edited(**{"distill.stage2.lr": 3.3e-5})) == {"stage2"}
    assert changed_slices(*edited(**{"distill.stage1.lr": 3.3e-4})) == {"stage1"}
    assert changed_slices(*edited(**{"distill.stage2.tokens": 10_000})) == {"stage2", "teacher-cache", "rounds"}
    assert changed_slices(*edited(**{"seed": 7})) >= set(TRAINING_SLICES) - {"teacher-cache", "rounds"}


def test_a_slice_file_loads_as_a_view_that_names_what_the_step_may_not_read(tmp_path):
    config = validate_config({})
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(slice_file_content(config, "stage2")))
    view = load_config(path)
    assert view["distill"]["stage2"] == config["distill"]["stage2"]
    assert view["seed"] == config["seed"]
    with pytest.raises(UnreadKey, match=r"config key distill\.stage1 is not in the 'stage2' slice"):
        view["distill"]["stage1"]
    with pytest.raises(UnreadKey, match=r"config key selection is not in the 'stage2' slice"):
        view.get("selection", {})
    assert copy.deepcopy(view)["distill"]["temperature"] == config["distill"]["temperature"]
