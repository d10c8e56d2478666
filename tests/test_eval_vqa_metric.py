"""The official VQA accuracy and answer normalisation, on hand-computed cases."""
import pytest

from vlp.pipeline.eval.vqa.metric import (
    CONTRACTIONS,
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
    # ten identical "Red": no prediction can earn anything, so there is no target
    assert answer_soft_scores(["Red"] * 10) == {}


def test_score_predictions_overall_and_per_answer_type():
    answers = {1: ["yes"] * 10, 2: ["2"] * 10, 3: ["red"] * 2 + ["blue"] * 8}
    types = {1: "yes/no", 2: "number", 3: "other"}
    metrics = score_predictions({1: "yes", 2: "3", 3: "red"}, answers, types)
    other = (2 * 1 / 3 + 8 * 2 / 3) / 10
    assert list(metrics) == ["overall", "yes/no", "number", "other"]
    assert metrics["yes/no"] == 100 and metrics["number"] == 0
    assert metrics["other"] == pytest.approx(100 * other)
    assert metrics["overall"] == pytest.approx(100 * (1 + 0 + other) / 3)


def test_score_predictions_per_question_type_for_the_questions_that_have_one():
    answers = {1: ["red"] * 10, 2: ["blue"] * 10, 3: ["red"] * 10, 4: ["2"] * 10}
    types = {1: "other", 2: "other", 3: "other", 4: "number"}
    question_types = {1: "what color is the", 2: "what color is the", 4: "how many"}
    metrics = score_predictions({1: "red", 2: "red", 3: "red", 4: "2"}, answers, types,
                                question_types)
    assert metrics == {"overall": 75, "number": 100, "other": pytest.approx(200 / 3),
                       "question_type/how many": 100, "question_type/what color is the": 50}
    assert list(metrics)[-2:] == ["question_type/how many", "question_type/what color is the"]
    assert "question_type/how many" not in score_predictions({1: "red"}, answers, types,
                                                             question_types)


@pytest.mark.parametrize("word, digit", [
    ("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
    ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"),
])
def test_number_words_up_to_ten_become_digits(word, digit):
    assert normalize_answer(f"{word.title()} dogs") == f"{digit} dogs"
    assert normalize_answer("eleven") == "eleven"  # the official table stops at ten


@pytest.mark.parametrize("mark", list(';/[]"{}()=+\\_-><@`,?!'))
def test_each_official_mark_becomes_a_space_between_words_or_goes_beside_one(mark):
    assert process_punctuation(f"red{mark}blue") == "red blue"
    assert process_punctuation(f"red{mark} blue") == "red blue"
    assert process_punctuation(f"red {mark}blue") == "red blue"
    assert process_punctuation(f"1,000{mark}5") == "10005"


def test_marks_outside_the_official_list_are_kept():
    assert process_punctuation("rock'n'roll: 50% off* #1 & ~ $ ^ |") == (
        "rock'n'roll: 50% off* #1 & ~ $ ^ |")


def test_at_most_32_periods_are_removed_as_the_official_code_does():
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("3.5. 2.") == "3.5 2"


def test_contractions_are_restored_in_lower_case_only():
    for short, full in CONTRACTIONS.items():
        # each entry only places apostrophes (one official quirk: "somebody'd" loses its own)
        assert short.replace("'", "") == full.replace("'", "")
        if short == short.lower():
            assert normalize_answer(short) == full
    # keys with a capital I never match: the official code lower-cases the answer first
    for word in ("im", "ive", "id've", "i'dve"):
        assert normalize_answer(word) == word
    assert normalize_answer("Dont, Thats") == "don't that's"


def test_tabs_and_newlines_count_as_spaces_beside_a_mark():
    # "/" beside a space anywhere deletes every "/" (official rule), so "red/blue" joins up
    assert normalize_answer("red/blue\t/green") == "redblue green"
    assert normalize_answer("red/blue\n/green") == "redblue green"
    assert normalize_answer("red/blue /green") == "redblue green"


def test_unknown_answer_types_follow_the_official_three_by_name_and_nothing_is_an_error():
    answers = {q: ["red"] * 10 for q in range(5)}
    types = {0: "zeta", 1: "other", 2: "alpha", 3: "yes/no", 4: "number"}
    metrics = score_predictions({q: "red" for q in range(5)}, answers, types)
    assert list(metrics) == ["overall", "yes/no", "number", "other", "alpha", "zeta"]
    with pytest.raises(ValueError, match="^no predictions to score$"):
        score_predictions({}, answers, types)
