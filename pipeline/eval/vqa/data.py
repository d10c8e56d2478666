"""VQAv2 question + annotation JSON and their images, checked before any model work.

Files of a split, as the official release and the synthetic world name them:
    *_{split}_questions.json    {"data_subtype": ..., "questions": [{question_id, image_id,
                                                                       question}]}
    *_{split}_annotations.json  {"annotations": [{question_id, answers: [{answer}] x 10,
                                                 answer_type, question_type}]}
                                                (question_type optional: per-type scores)
Images are found with a pattern relative to the image root, formatted with the questions file's
`data_subtype` as {split} and the {image_id}; by default the first of IMAGE_PATTERNS that exists.
A path that leaves the image root (a `data_subtype` with `..`) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import read_json, require, require_dir
from vlp.pipeline.eval.images import ImageRef, check_images_exist, path_under

IMAGE_PATTERNS = (
    "images/{split}/{image_id:012d}.jpg",  # synthetic world (data_prep.synth)
    "{split}/COCO_{split}_{image_id:012d}.jpg",  # VQAv2 on COCO: train2014/COCO_train2014_...
)


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    question: str
    image: ImageRef
    answers: tuple[str, ...]  # the human answers (ten in VQAv2)
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str | None = None  # VQAv2's question prefix, e.g. "what color is the"


def find_split_files(vqa_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(questions, annotations) JSON of `split` in `vqa_dir`; an error lists what is there."""
    vqa_dir = require_dir(vqa_dir, "--vqa-dir")
    found = []
    for kind in ("questions", "annotations"):
        matches = sorted(vqa_dir.glob(f"*_{split}_{kind}.json"))
        if len(matches) != 1:
            present = sorted(p.name for p in vqa_dir.glob("*.json"))
            raise UserError(
                f"expected one *_{split}_{kind}.json in {vqa_dir}, found {len(matches)}; "
                f"JSON files there: {present}"
            )
        found.append(matches[0])
    return found[0], found[1]


def load_vqa_split(
    questions_path: str | Path,
    annotations_path: str | Path,
    image_root: str | Path,
    image_pattern: str | None = None,
) -> list[VQAExample]:
    """Every question of the questions file, with its annotation and image (all required)."""
    questions_doc = read_json(questions_path, "VQA questions file")
    questions = require(questions_doc, "questions", str(questions_path), list)
    annotations_doc = read_json(annotations_path, "VQA annotations file")
    annotations = {}
    for i, ann in enumerate(require(annotations_doc, "annotations", str(annotations_path), list)):
        where = f"{annotations_path}: annotations[{i}]"
        qid = require(ann, "question_id", where, int)
        answers = [require(a, "answer", f"{where}.answers[{j}]", str)
                   for j, a in enumerate(require(ann, "answers", where, list))]
        if not answers:
            raise UserError(f"{where}: 'answers' is empty")
        question_type = (require(ann, "question_type", where, str)
                         if "question_type" in ann else None)
        annotations[qid] = (tuple(answers), require(ann, "answer_type", where, str),
                            question_type)
    if not questions:
        raise UserError(f"{questions_path}: no questions (empty split)")

    subtype = str(questions_doc.get("data_subtype", ""))
    pattern = image_pattern or _detect_pattern(image_root, subtype, questions, questions_path)
    examples, unannotated = [], []
    for i, q in enumerate(questions):
        where = f"{questions_path}: questions[{i}]"
        qid = require(q, "question_id", where, int)
        image_id = require(q, "image_id", where, int)
        if qid not in annotations:
            unannotated.append(qid)
            continue
        path = path_under(image_root, pattern.format(split=subtype, image_id=image_id), where)
        answers, answer_type, question_type = annotations[qid]
        examples.append(VQAExample(qid, require(q, "question", where, str), ImageRef(str(path)),
                                   answers, answer_type, question_type))
    if unannotated:
        raise UserError(
            f"{len(unannotated)} question(s) in {questions_path} have no annotation in "
            f"{annotations_path}, e.g. question_id {unannotated[:3]}"
        )
    check_images_exist([e.image for e in examples], f"{questions_path} (image root {image_root})")
    return examples


def _detect_pattern(image_root, subtype: str, questions: list, questions_path) -> str:
    first = questions[0]
    image_id = require(first, "image_id", f"{questions_path}: questions[0]", int)
    where = f"{questions_path}: data_subtype {subtype!r}, questions[0]"
    for pattern in IMAGE_PATTERNS:
        relative = pattern.format(split=subtype, image_id=image_id)
        if path_under(image_root, relative, where).is_file():
            return pattern
    tried = [str(Path(image_root) / p.format(split=subtype, image_id=image_id))
             for p in IMAGE_PATTERNS]
    raise UserError(
        f"no image for question 0 of {questions_path}; tried {tried}. "
        "Pass image_pattern (e.g. '{split}/COCO_{split}_{image_id:012d}.jpg') "
        "or the right image root"
    )
