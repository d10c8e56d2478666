"""The official VQA accuracy, reimplemented from the VQA evaluator (GT-Vision-Lab/VQA, vqaEval.py).

Per question: the predicted answer is normalised (punctuation, then lower case, number words to
digits, articles dropped, contractions restored). The ten human answers get the punctuation step
only, and only when they are not all identical. Accuracy is min(#humans that gave the answer / 3,
1), averaged over the ten leave-one-out subsets of nine humans. Quirks of the official code are
kept on purpose (marked below), so numbers match the evaluation server.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
]
# "(?!<=\d)" is a lookahead, not the lookbehind it was meant to be; kept: a period is removed
# unless a digit follows it ("2.5" stays, "yes." -> "yes").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
ANSWER_TYPES = ("yes/no", "number", "other")


def process_punctuation(text: str) -> str:
    """Official punctuation rule: a mark next to a space, or any mark in a text with a comma
    between digits ("1,000"), is deleted; otherwise it becomes a space ("red/blue" -> "red blue").
    Periods not followed by a digit are deleted."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official code passes re.UNICODE (= 32) where `count` goes: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """Official word rule: lower case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluator compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official per-question accuracy in [0, 1] of `prediction` against the human answers."""
    prediction = normalize_answer(prediction)
    if len(set(human_answers)) > 1:
        human_answers = [process_punctuation(a) for a in human_answers]
    # Leave each human out in turn (the official code drops the one answer dict, which is unique
    # by answer_id) and count how many of the others gave the prediction.
    accs = []
    for left_out in range(len(human_answers)):
        others = human_answers[:left_out] + human_answers[left_out + 1 :]
        accs.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(accs) / len(accs)


def answer_soft_scores(human_answers: list[str]) -> dict[str, float]:
    """Training targets: each distinct normalised answer with the accuracy predicting it earns
    (1, 2, 3+ of ten humans -> 0.3, 0.6, 0.9/1.0), so the loss rewards what the metric rewards."""
    candidates = {normalize_answer(a) for a in human_answers}
    scores = {c: vqa_accuracy(c, human_answers) for c in candidates}
    return {c: s for c, s in scores.items() if s > 0}


def score_predictions(
    predictions: Mapping[int, str],
    human_answers: Mapping[int, list[str]],
    answer_types: Mapping[int, str],
    question_types: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """Accuracy in percent over the questions of `predictions`: overall, per answer type, and
    per question type as "question_type/<type>" (the official evaluator's perQuestionType) for
    the questions `question_types` names."""
    if not predictions:
        raise ValueError("no predictions to score")
    question_types = question_types or {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    overall = []
    for qid, prediction in predictions.items():
        acc = vqa_accuracy(prediction, human_answers[qid])
        overall.append(acc)
        by_answer_type[answer_types[qid]].append(acc)
        if qid in question_types:
            by_question_type[question_types[qid]].append(acc)
    metrics = {"overall": 100 * _mean(overall)}
    for answer_type in sorted(by_answer_type, key=_type_order):
        metrics[answer_type] = 100 * _mean(by_answer_type[answer_type])
    for question_type in sorted(by_question_type):
        metrics[f"question_type/{question_type}"] = 100 * _mean(by_question_type[question_type])
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _type_order(answer_type: str) -> tuple[int, str]:
    return (ANSWER_TYPES.index(answer_type) if answer_type in ANSWER_TYPES else 99, answer_type)
