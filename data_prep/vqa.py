"""Questions about scenes, and ten simulated human answers per question (VQAv2 style).

Only unambiguous questions are asked ("what colour is the circle?" only when there is one
circle). Annotators mostly agree; they use synonyms the official VQA normalisation reconciles
("2"/"two", "0"/"none") and some it does not ("grey"/"gray", "center"/"centre"), and about one
answer in twenty is simply wrong. Existence questions are as often yes as no, half of the "no"
ones naming a colour or a shape that is in the picture (so the binding matters).
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from vlp.data_prep.captions import POSITION_PHRASES, colour_word, pick, with_article
from vlp.data_prep.scenes import Scene, WorldSpec

POSITION_ANSWERS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
# Canonical answer -> other ways annotators say it.
ANSWER_SYNONYMS = {
    "grey": ("gray",),
    "0": ("none", "zero"),
    "1": ("one",),
    "2": ("two",),
    "3": ("three",),
    "top left": ("upper left", "top left corner"),
    "top": ("top middle", "top center"),
    "top right": ("upper right", "top right corner"),
    "left": ("left side", "middle left"),
    "center": ("centre", "middle"),
    "right": ("right side", "middle right"),
    "bottom left": ("lower left", "bottom left corner"),
    "bottom": ("bottom middle", "bottom center"),
    "bottom right": ("lower right", "bottom right corner"),
}
SYNONYM_RATE = 0.3
WRONG_RATE = 0.05
MAYBE_RATE = 0.1


@dataclass(frozen=True)
class Question:
    question: str
    question_type: str  # VQAv2's question prefix, e.g. "what color is the"
    answer_type: str  # "yes/no" | "number" | "other"
    answer: str  # canonical answer
    wrong: tuple[str, ...]  # what a careless annotator might answer instead


def _exists(scene: Scene, spec: WorldSpec, rng, yes: bool) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if yes:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
    else:
        absent = [(c, s) for c in spec.colours for s in spec.shapes if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pool = near if near and rng.random() < 0.5 else absent
        colour, shape = pool[int(rng.integers(len(pool)))]
    return Question(
        f"is there {with_article(colour_word(rng, colour))} {shape}?",
        "is there a", "yes/no", "yes" if yes else "no", ("no",) if yes else ("yes",),
    )  # fmt: skip


def _count(scene: Scene, spec: WorldSpec, rng) -> Question:
    if rng.random() < 0.5:
        count = len(scene.objects)
        text = pick(rng, ("how many shapes are there?", "how many objects are there?"))
    else:
        present = sorted({o.colour for o in scene.objects})
        absent = [c for c in spec.colours if c not in present]
        colour = pick(rng, present if not absent or rng.random() < 0.7 else absent)
        count = sum(o.colour == colour for o in scene.objects)
        text = f"how many {colour_word(rng, colour)} shapes are there?"
    numbers = [str(n) for n in range(spec.max_objects + 1) if n != count]
    return Question(text, "how many", "number", str(count), tuple(numbers))


def _unique_by_shape(scene: Scene):
    counts = Counter(o.shape for o in scene.objects)
    return [o for o in scene.objects if counts[o.shape] == 1]


def _colour(scene: Scene, spec: WorldSpec, rng) -> Question | None:
    candidates = _unique_by_shape(scene)
    if not candidates:
        return None
    obj = pick(rng, candidates)
    word = pick(rng, ("colour", "color"))
    others = tuple(c for c in spec.colours if c != obj.colour)
    text = f"what {word} is the {obj.shape}?"
    return Question(text, "what color is the", "other", obj.colour, others)


def _shape(scene: Scene, spec: WorldSpec, rng) -> Question:
    obj = pick(rng, scene.objects)
    others = tuple(s for s in spec.shapes if s != obj.shape)
    where = pick(rng, POSITION_PHRASES[obj.cell])
    return Question(f"what shape is {where}?", "what shape is", "other", obj.shape, others)


def _position(scene: Scene, spec: WorldSpec, rng) -> Question | None:
    candidates = _unique_by_shape(scene)
    if not candidates:
        return None
    obj = pick(rng, candidates)
    answer = POSITION_ANSWERS[obj.cell]
    others = tuple(a for a in POSITION_ANSWERS.values() if a != answer)
    return Question(f"where is the {obj.shape}?", "where is the", "other", answer, others)


# A yes and a no existence kind: a third of the questions are yes/no (as in VQAv2), balanced.
KINDS = (
    functools.partial(_exists, yes=True),
    functools.partial(_exists, yes=False),
    _count, _colour, _shape, _position,
)  # fmt: skip


def ask(scene: Scene, spec: WorldSpec, rng: np.random.Generator, k: int) -> list[Question]:
    """Up to `k` distinct, unambiguous questions about `scene`."""
    questions: list[Question] = []
    for index in rng.permutation(len(KINDS)):
        question = KINDS[int(index)](scene, spec, rng)
        if question is not None and question.question not in {q.question for q in questions}:
            questions.append(question)
        if len(questions) == k:
            break
    return questions


def human_answers(question: Question, rng: np.random.Generator) -> list[dict]:
    """Ten VQAv2 answer records: mostly the answer or a synonym, sometimes a wrong one."""
    answers = []
    for answer_id in range(1, 11):
        if rng.random() < WRONG_RATE:
            text = pick(rng, question.wrong)
        elif question.answer in ANSWER_SYNONYMS and rng.random() < SYNONYM_RATE:
            text = pick(rng, ANSWER_SYNONYMS[question.answer])
        else:
            text = question.answer
        confidence = "maybe" if rng.random() < MAYBE_RATE else "yes"
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": answer_id})
    return answers


def annotation(question: Question, question_id: int, image_id: int, rng) -> dict:
    """One VQAv2 annotation record; multiple_choice_answer is the most frequent answer."""
    answers = human_answers(question, rng)
    majority = Counter(a["answer"] for a in answers).most_common(1)[0][0]
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": question.question_type,
        "answer_type": question.answer_type,
        "multiple_choice_answer": majority,
        "answers": answers,
    }
