from fractions import Fraction

import pytest

from hybrid_distill.select.layer_sets import (
    k_from_ratio,
    random_layers,
    rank_average,
    ranking_from_importance,
    top_k_layers,
    uniform_layers,
    validate_layer_list,
)


@pytest.mark.parametrize(
    ("num_layers", "ratio", "expected"),
    [
        (36, 0.25, 9), (36, 1 / 3, 12), (36, 0.5, 18), (36, 1.0, 36),
        (28, 0.25, 7), (28, 0.5, 14), (28, 1 / 3, 9),
        (36, 0.125, 5),  # 4.5 rounds up; Python's round() would give 4
        (28, 0.125, 4),  # 3.5 rounds up; round() would also give 4 (half-to-even)
        (30, 0.25, 8),   # 7.5 rounds up; round() would give 8 too
        (10, 0.25, 3),   # 2.5 rounds up; round() would give 2
        (10, 0.15, 2),   # 1.5 exactly as written, despite 0.15 not being a binary float
        (4, 0.01, 1),    # never below 1
        (36, Fraction(1, 9), 4),
    ],
)
def test_k_from_ratio(num_layers, ratio, expected):
    assert k_from_ratio(num_layers, ratio) == expected


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.01, 2])
def test_k_from_ratio_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=f"ratio must be in \\(0, 1\\], got {ratio!r}"):
        k_from_ratio(36, ratio)


def test_top_k_layers_from_sequence_and_dict():
    importance = [-0.5, -0.1, -0.9, -0.2, -0.05]
    assert top_k_layers(importance, 2) == [1, 4]
    assert top_k_layers(dict(enumerate(importance)), 3) == [1, 3, 4]
    assert top_k_layers({7: 1.0, 3: 2.0, 5: 0.0}, 1) == [3]


def test_top_k_layers_ties_go_to_lower_index():
    assert top_k_layers([0.0, 1.0, 1.0, 1.0, 0.0], 2) == [1, 2]
    assert top_k_layers({9: 0.3, 2: 0.3, 5: 0.3}, 2) == [2, 5]
    assert ranking_from_importance([0.0, 1.0, 1.0, 2.0]) == [3, 1, 2, 0]


def test_top_k_layers_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        top_k_layers([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="layer 1 is not finite"):
        top_k_layers([1.0, float("nan")], 1)


@pytest.mark.parametrize(
    ("num_layers", "k", "expected"),
    [
        (8, 2, [3, 7]),
        (30, 4, [7, 14, 22, 29]),  # block ends 7.5, 15, 22.5, 30 rounded half up, minus 1
        (36, 9, [3, 7, 11, 15, 19, 23, 27, 31, 35]),
        (28, 7, [3, 7, 11, 15, 19, 23, 27]),
        (36, 4, [8, 17, 26, 35]),
        (10, 3, [2, 6, 9]),  # 3.33, 6.67, 10 -> 3, 7, 10
        (5, 5, [0, 1, 2, 3, 4]),
        (36, 36, list(range(36))),
        (7, 1, [6]),
    ],
)
def test_uniform_layers(num_layers, k, expected):
    assert uniform_layers(num_layers, k) == expected


def test_uniform_layers_are_distinct_and_end_at_last_layer():
    for num_layers in range(1, 40):
        for k in range(1, num_layers + 1):
            layers = uniform_layers(num_layers, k)
            assert len(set(layers)) == k and layers == sorted(layers)
            assert layers[-1] == num_layers - 1 and layers[0] >= 0


def test_random_layers_reproducible_and_valid():
    first = random_layers(36, 9, seed=3)
    assert first == random_layers(36, 9, seed=3)
    assert first == sorted(set(first)) and len(first) == 9 and all(0 <= i < 36 for i in first)
    assert any(random_layers(36, 9, seed=s) != first for s in range(4, 8))
    assert random_layers(5, 5, seed=0) == [0, 1, 2, 3, 4]


def test_rank_average():
    ga = [2, 0, 1, 3]  # positions: 2->0, 0->1, 1->2, 3->3
    gr = [0, 3, 2, 1]  # positions: 0->0, 3->1, 2->2, 1->3
    # sums: 0 -> 1, 1 -> 5, 2 -> 2, 3 -> 4
    assert rank_average(ga, gr) == [0, 2, 3, 1]
    # tie in mean position (1 vs 0, both sum 1) goes to the lower index
    assert rank_average([1, 0], [0, 1]) == [0, 1]
    assert rank_average([3, 1, 2]) == [3, 1, 2]


def test_rank_average_rejects_mismatched_rankings():
    with pytest.raises(ValueError, match="ranking 1 does not rank the same layers"):
        rank_average([0, 1, 2], [0, 1, 3])
    with pytest.raises(ValueError, match="ranking 0 lists a layer more than once"):
        rank_average([0, 0, 1], [0, 1, 2])


def test_validate_layer_list():
    assert validate_layer_list([5, 0, 3], 6, "softmax_layers") == [0, 3, 5]
    with pytest.raises(ValueError, match=r"^softmax_layers: layer index 6 is out of range .* 6 layers"):
        validate_layer_list([0, 6], 6, "softmax_layers")
    with pytest.raises(ValueError, match=r"^postnas_layers: layer index -1 is out of range"):
        validate_layer_list([-1], 6, "postnas_layers")
    with pytest.raises(ValueError, match=r"^softmax_layers: layer index 2 appears more than once$"):
        validate_layer_list([2, 2], 6, "softmax_layers")
    with pytest.raises(ValueError, match=r"^softmax_layers: layer index '3' is not an integer$"):
        validate_layer_list(["3"], 6, "softmax_layers")
