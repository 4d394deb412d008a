import pytest

from hybrid_distill.select.early_stop import early_stop_decision, jaccard, mean_pairwise_jaccard


def test_jaccard_known_values():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard({1, 2}, {1, 2}) == 1.0
    assert jaccard({1}, {2}) == 0.0
    assert jaccard(set(), set()) == 1.0
    assert jaccard([0, 1, 2, 3], [0, 1, 2, 4]) == 0.6


def test_mean_pairwise_jaccard_known_values():
    assert mean_pairwise_jaccard([{1, 2}]) == 1.0
    # pairs: (a,b) 1/3, (a,c) 0, (b,c) 1/3
    assert mean_pairwise_jaccard([{1, 2}, {2, 3}, {3, 4}]) == pytest.approx(2 / 9)
    with pytest.raises(ValueError):
        mean_pairwise_jaccard([])


def test_identical_sets_fire_at_first_full_window():
    decision = early_stop_decision([{0, 5, 9, 13}] * 15, k=4, window=10)
    assert decision["stop"] is True and decision["snapshot"] == 9
    assert decision["mean_jaccard"][:9] == [None] * 9 and decision["mean_jaccard"][9:] == [1.0] * 6
    assert decision["backbone"][9] == 4 and decision["union"][9] == 4


def test_set_that_flips_every_snapshot_never_fires():
    sets = [{0, 1, 2, 3} if i % 2 == 0 else {4, 5, 6, 7} for i in range(30)]
    decision = early_stop_decision(sets, k=4, window=10)
    assert decision["stop"] is False and decision["snapshot"] is None
    assert decision["backbone"][29] == 0 and decision["union"][29] == 8


def test_fires_once_noise_has_left_the_window():
    noisy = [{10 * i, 10 * i + 1, 10 * i + 2} for i in range(1, 6)]  # disjoint from everything
    decision = early_stop_decision(noisy + [{0, 1, 2}] * 20, k=3, window=4)
    assert decision["snapshot"] == 5 + 4 - 1


def test_too_few_snapshots_never_fire():
    decision = early_stop_decision([{0, 1}] * 9, k=2, window=10)
    assert decision == {"stop": False, "snapshot": None, "mean_jaccard": [None] * 9,
                        "backbone": [None] * 9, "union": [None] * 9}


def test_series_known_values():
    decision = early_stop_decision([{0, 1}, {0, 2}, {0, 2}], k=2, window=2)
    assert decision["mean_jaccard"] == [None, 1 / 3, 1.0]
    assert decision["backbone"] == [None, 1, 2]
    assert decision["union"] == [None, 3, 2]
    assert decision["snapshot"] == 2  # 1/3 < 0.9 at snapshot 1
    assert early_stop_decision([{0, 1}, {0, 2}, {0, 2}], k=2, window=2, min_mean_jaccard=0.3)["snapshot"] == 1
    assert early_stop_decision([{0, 1}, {0, 2}, {0, 2}], k=2, window=2, min_mean_jaccard=0.34)["snapshot"] == 2


def test_jaccard_exactly_at_threshold_fires():
    sets = [set(range(10)), set(range(9))]  # Jaccard 9/10
    assert early_stop_decision(sets, k=10, window=2, min_mean_jaccard=0.9)["snapshot"] == 1
    assert early_stop_decision(sets, k=10, window=2, min_mean_jaccard=0.91)["snapshot"] is None


def test_only_jaccard_fails():
    # Backbone {0,1,2} (= K-1) and union {0..4} (= K+1) pass, but mean Jaccard is 35/45 < 0.9.
    sets = [{0, 1, 2, 3}, {0, 1, 2, 4}] * 5
    decision = early_stop_decision(sets, k=4, window=10)
    assert (decision["backbone"][9], decision["union"][9]) == (3, 5)
    assert decision["mean_jaccard"][9] == pytest.approx(35 / 45)
    assert decision["snapshot"] is None
    assert early_stop_decision(sets, k=4, window=10, min_mean_jaccard=0.77)["snapshot"] == 9


def test_only_backbone_fails():
    # K = 20: eight sets miss layer 20, one misses 19, one misses 18 -> backbone 18 < K-1, union 21.
    full = set(range(21))
    sets = [full - {20}] * 8 + [full - {19}, full - {18}]
    decision = early_stop_decision(sets, k=20, window=10)
    assert decision["backbone"][9] == 18 and decision["union"][9] == 21
    assert decision["mean_jaccard"][9] == pytest.approx((28 + 17 * 19 / 21) / 45)
    assert decision["mean_jaccard"][9] >= 0.9
    assert decision["snapshot"] is None
    assert early_stop_decision(sets, k=20, window=10, min_backbone=18)["snapshot"] == 9


def test_only_union_fails():
    # K = 20: a backbone of 19 plus one of three different extra layers -> union 22 > K+1.
    backbone = set(range(19))
    sets = [backbone | {19}] * 8 + [backbone | {20}, backbone | {21}]
    decision = early_stop_decision(sets, k=20, window=10)
    assert decision["backbone"][9] == 19 and decision["union"][9] == 22
    assert decision["mean_jaccard"][9] >= 0.9
    assert decision["snapshot"] is None
    assert early_stop_decision(sets, k=20, window=10, max_union=22)["snapshot"] == 9


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        early_stop_decision([{0}], k=1, window=0)
    with pytest.raises(ValueError, match="k must be"):
        early_stop_decision([{0}], k=0)
