"""The official VQA accuracy and answer normalisation, on hand-computed cases."""
import pytest

from vlp.pipeline.eval.vqa.metric import (
    answer_soft_scores,
    normalize_answer,
    process_punctuation,
    score_predictions,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("none", "0"),
    ("yes.", "yes"),
    ("  Yes\n", "yes"),
    ("the red cube", "red cube"),
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("2.5", "2.5"),            # a period before a digit stays
    ("1,000", "1000"),         # comma between digits: every mark is deleted, not spaced
    ("red/blue", "red blue"),  # a mark between letters becomes a space
    ("red, blue", "red blue"),  # a mark next to a space is deleted
    ("t-shirt", "t shirt"),
    ("what?!", "what"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_comma_between_digits_changes_the_rule_for_all_marks():
    assert process_punctuation("1,000 red/blue") == "1000 redblue"


def test_min_of_matches_over_three_averaged_over_leave_one_out():
    # 2 of 10 humans said "red": leaving out a "red" leaves 1 match (1/3), else 2 (2/3)
    answers = ["red", "red"] + ["blue"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    # 3 matches: (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("blue", ["blue"] * 3 + ["red"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("blue", ["blue"] * 4 + ["red"] * 6) == 1.0
    assert vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.9 * 1 / 3)


def test_prediction_is_normalised_human_answers_get_punctuation_only():
    # "two" -> "2" for the prediction; the humans' "two" is not rewritten (official behaviour)
    answers = ["2"] * 3 + ["two"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 5 + ["cat"] * 5) == 1.0


def test_all_identical_human_answers_are_left_raw():
    # all ten identical: no processing, so "yes." never equals the normalised prediction "yes"
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # one differs: punctuation is stripped from all ten, and they match
    assert vqa_accuracy("yes", ["yes."] * 9 + ["yes"]) == 1.0


def test_soft_scores_are_the_accuracy_each_answer_earns():
    assert answer_soft_scores(["red"] * 7 + ["blue"] * 2 + ["green"]) == {
        "red": 1.0, "blue": pytest.approx(0.6), "green": pytest.approx(0.3)}
    assert answer_soft_scores(["2"] * 3 + ["two"] * 7) == {"2": pytest.approx(0.9)}
    # humans are not lower-cased by the official code: "Red" does not count for "red"
    assert answer_soft_scores(["red"] * 2 + ["Red"] + ["blue"] * 7)["red"] == pytest.approx(0.6)


def test_score_predictions_overall_and_per_answer_type():
    answers = {1: ["yes"] * 10, 2: ["2"] * 10, 3: ["red"] * 2 + ["blue"] * 8}
    types = {1: "yes/no", 2: "number", 3: "other"}
    metrics = score_predictions({1: "yes", 2: "3", 3: "red"}, answers, types)
    other = (2 * 1 / 3 + 8 * 2 / 3) / 10
    assert list(metrics) == ["overall", "yes/no", "number", "other"]
    assert metrics["yes/no"] == 100 and metrics["number"] == 0
    assert metrics["other"] == pytest.approx(100 * other)
    assert metrics["overall"] == pytest.approx(100 * (1 + 0 + other) / 3)
