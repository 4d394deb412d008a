"""GA-iter: greedy picks, ties, prefixes, and the step job's file checks (exact values, tiny JSON files)."""
from __future__ import annotations

import json
import re

import pytest

from hybrid_distill.select.greedy import best_candidate, greedy_layers, greedy_step
from hybrid_distill.distill.jobs import drop_training_state as drop_state
from hybrid_distill.select.greedy_jobs import choose_greedy_layer, read_greedy_choice
from hybrid_distill.select.importance import choose_layers
from hybrid_distill.select.score_files import ScoreFileError


def test_best_candidate_has_the_lowest_kl_and_ties_go_to_the_lower_layer():
    assert best_candidate({0: 0.5, 1: 0.2, 2: 0.3}) == 1
    assert best_candidate({3: 0.2, 1: 0.2, 2: 0.9}) == 1
    assert best_candidate({2: 0.0, 0: 0.0}) == 0


def test_greedy_step_appends_the_best_of_the_remaining_layers():
    assert greedy_step([], {0: 0.4, 1: 0.1, 2: 0.3, 3: 0.2}, 4) == [1]
    assert greedy_step([1], {0: 0.05, 2: 0.01, 3: 0.01}, 4) == [1, 2]


@pytest.mark.parametrize("chosen, scores, message", [
    ([1], {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.1}, "candidates after [1] are [0, 2, 3]"),
    ([1], {0: 0.1, 2: 0.1}, "candidates after [1] are [0, 2, 3]"),
    ([1, 1], {0: 0.1, 2: 0.1, 3: 0.1}, "not distinct layers"),
    ([4], {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.1}, "not distinct layers of 0..3"),
    ([], {0: 0.1, 1: float("nan"), 2: 0.1, 3: 0.1}, "layer 1 is not finite"),
])
def test_greedy_step_refuses_scores_of_the_wrong_layers(chosen, scores, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        greedy_step(chosen, scores, 4)


def test_sets_for_every_k_are_prefixes_of_the_pick_order():
    order = [5, 0, 3, 7]
    sets = [greedy_layers(order, k) for k in range(1, 5)]
    assert sets == [[5], [0, 5], [0, 3, 5], [0, 3, 5, 7]]
    assert all(set(small) <= set(large) for small, large in zip(sets, sets[1:]))
    assert choose_layers("ga_iter", 2, 8, pick_order=order) == [0, 5]


def test_greedy_layers_refuses_a_k_beyond_the_steps_made():
    with pytest.raises(ValueError, match="K=3 needs 3 greedy steps but 2 were made"):
        greedy_layers([1, 2], 3)
    with pytest.raises(ValueError, match="needs its greedy pick order"):
        choose_layers("ga_iter", 1, 4)


def _score(path, softmax_layers, kl, step=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"softmax_layers": softmax_layers, "heldout_kl": kl, "step": step, "tokens": 96}))
    return path


def test_two_steps_pick_greedily_and_drop_the_scoring_states(tmp_path):
    first = [_score(tmp_path / f"swap/layer{i}/round2.json", [i], kl) for i, kl in enumerate([0.4, 0.1, 0.3, 0.2])]
    step0 = choose_greedy_layer(0, 4, [0, 1, 2, 3], first, tmp_path / "step0.json")
    assert step0 == {"step": 0, "picked": 1, "chosen": [1], "train_steps": 3,
                     "heldout_kl": {"0": 0.4, "1": 0.1, "2": 0.3, "3": 0.2}}
    files = []
    for layer, kl in ((0, 0.05), (2, 0.01), (3, 0.01)):
        files.append(_score(tmp_path / f"step1/layer{layer}/score.json", sorted([1, layer]), kl))
        (tmp_path / f"step1/layer{layer}/stage2/state/step_00000003").mkdir(parents=True)
    step1 = choose_greedy_layer(1, 4, [0, 2, 3], files, tmp_path / "step1.json",
                                previous_file=tmp_path / "step0.json", drop_states=True)
    assert step1["chosen"] == [1, 2] and step1["picked"] == 2  # 2 and 3 tie: the lower index
    assert read_greedy_choice(tmp_path / "step1.json")["chosen"] == [1, 2]
    assert not list(tmp_path.glob("step1/layer*/stage2/state")) and not list(tmp_path.rglob(".state.retired"))
    assert not list(tmp_path.rglob("*.partial"))


def test_step0_takes_ga_s2_scores_of_raced_out_layers_and_later_steps_train_the_longest_budget(tmp_path):
    steps = [3, 3, 1, 1]  # layers 2 and 3 left the race after one step (scoring.racing)
    first = [_score(tmp_path / f"swap/layer{i}/round.json", [i], kl, step)
             for i, (kl, step) in enumerate(zip([0.4, 0.1, 0.3, 0.2], steps))]
    step0 = choose_greedy_layer(0, 4, [0, 1, 2, 3], first, tmp_path / "step0.json")
    assert step0["picked"] == 1 and step0["train_steps"] == 3


@pytest.mark.parametrize("content, reason", [
    (None, "FileNotFoundError"),
    ("{", "JSONDecodeError"),
    ('{"softmax_layers": [1, 0], "step": 3}', "KeyError: 'heldout_kl'"),
    ('{"softmax_layers": [1, 0], "heldout_kl": "x", "step": 3}', "ValueError"),
])
def test_a_corrupt_or_missing_score_is_one_line_naming_the_file(tmp_path, content, reason):
    _score(tmp_path / "step0.json", [], 0.0)
    (tmp_path / "step0.json").write_text(json.dumps({"step": 0, "chosen": [1], "train_steps": 3}))
    bad = tmp_path / "step1/layer0/score.json"
    if content is not None:
        bad.parent.mkdir(parents=True)
        bad.write_text(content)
    good = [_score(tmp_path / f"step1/layer{i}/score.json", [1, i], 0.1) for i in (2, 3)]
    with pytest.raises(ScoreFileError) as error:
        choose_greedy_layer(1, 4, [0, 2, 3], [bad, *good], tmp_path / "step1.json",
                            previous_file=tmp_path / "step0.json")
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and reason in message
    assert not (tmp_path / "step1.json").exists()


def test_scores_of_another_layer_set_or_budget_are_refused(tmp_path):
    (tmp_path / "step0.json").write_text(json.dumps({"step": 0, "chosen": [1], "train_steps": 3}))
    swapped = [_score(tmp_path / "a.json", [1, 3], 0.1), _score(tmp_path / "b.json", [1, 2], 0.1)]
    with pytest.raises(ScoreFileError, match=r"a.json scores softmax layers \[1, 3\], greedy step 1 expects \[1, 2\]"):
        choose_greedy_layer(1, 4, [2, 3], swapped, tmp_path / "out.json", previous_file=tmp_path / "step0.json")
    shorter = [_score(tmp_path / "c.json", [1, 2], 0.1, step=2), _score(tmp_path / "d.json", [1, 3], 0.1)]
    with pytest.raises(ScoreFileError, match="c.json trained 2 steps, greedy step 1 expects 3"):
        choose_greedy_layer(1, 4, [2, 3], shorter, tmp_path / "out.json", previous_file=tmp_path / "step0.json")
    (tmp_path / "broken.json").write_text('{"chosen": [1]}')
    with pytest.raises(ScoreFileError, match="greedy step file .*broken.json is corrupt"):
        read_greedy_choice(tmp_path / "broken.json")


def test_drop_state_leaves_nothing_that_looks_like_a_state(tmp_path):
    (tmp_path / "stage2/state/step_00000002").mkdir(parents=True)
    (tmp_path / "stage2/state/step_00000002/trainer_state.json").write_text("{}")
    drop_state(tmp_path / "stage2")
    drop_state(tmp_path / "stage2")  # a second call (a rerun) finds nothing to do
    assert [p.name for p in (tmp_path / "stage2").iterdir()] == []
