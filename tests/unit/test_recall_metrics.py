import pytest

from hybrid_distill.evaluate.recall_tasks import score_all, score_part, string_match_all, string_match_part


def test_score_all_is_the_fraction_of_references_found():
    assert score_all("The codes are 123 and 456.", ["123", "456"]) == 1.0
    assert score_all("The codes are 123 and 789.", ["123", "456"]) == 0.5
    assert score_all("The codes are 123.", ["123", "456", "789", "000"]) == 0.25
    assert score_all("nothing here", ["123"]) == 0.0


def test_score_part_is_one_if_any_reference_is_found():
    assert score_part("The codes are 123 and 789.", ["123", "456"]) == 1.0
    assert score_part("The codes are 999.", ["123", "456"]) == 0.0
    assert score_part("456", ["123", "456", "789"]) == 1.0


def test_matching_ignores_case_and_is_substring_based():
    assert score_all("VAR ABCDE and vwxyz", ["abcde", "VWXYZ"]) == 1.0
    assert score_part("the answer: Falcon", ["FALCON"]) == 1.0
    assert score_all("1234567", ["234"]) == 1.0  # a substring counts, as in RULER


def test_corpus_level_means():
    predictions = ["a b", "a", "nothing"]
    references = [["a", "b"], ["a", "b"], ["a", "b"]]
    assert string_match_all(predictions, references) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert string_match_part(predictions, references) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])


def test_empty_references_are_an_error():
    with pytest.raises(ValueError, match="at least one reference"):
        score_all("x", [])
    with pytest.raises(ValueError, match="at least one reference"):
        score_part("x", [])
