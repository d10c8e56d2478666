"""VQAv2 files: what a good split loads to, and each bad split's exact message, on a two-question
split written by hand (no model, no world)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.vqa.data import find_split_files, load_vqa_split


def write_split(root: Path, questions: dict | None = None, annotations: dict | None = None,
                images: tuple[int, ...] = (7, 9)) -> tuple[Path, Path]:
    """A val split in the synthetic world's layout: two questions about images 7 and 9."""
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    for image_id in images:
        (root / "images" / "val" / f"{image_id:012d}.jpg").write_bytes(b"not read here")
    questions = questions or {"data_subtype": "val", "questions": [
        {"question_id": 1, "image_id": 7, "question": "how many?"},
        {"question_id": 2, "image_id": 9, "question": "what shape is at the top?"}]}
    annotations = annotations or {"annotations": [
        {"question_id": 1, "answers": [{"answer": "2"}] * 10, "answer_type": "number",
         "question_type": "how many"},
        {"question_id": 2, "answers": [{"answer": "circle"}] * 10, "answer_type": "other"}]}
    paths = root / "v2_OpenEnded_synth_val_questions.json", root / "v2_synth_val_annotations.json"
    for path, doc in zip(paths, (questions, annotations)):
        path.write_text(json.dumps(doc))
    return paths


def test_a_split_loads_its_questions_answers_types_and_images(tmp_path):
    paths = write_split(tmp_path)
    assert find_split_files(tmp_path, "val") == paths
    first, second = load_vqa_split(*paths, tmp_path)
    assert (first.question_id, first.question, first.answers, first.answer_type,
            first.question_type) == (1, "how many?", ("2",) * 10, "number", "how many")
    assert second.question_type is None  # optional: no per-type score for it
    assert first.image.path == str(tmp_path / "images" / "val" / "000000000007.jpg")


def test_split_files_are_found_by_name_and_the_error_lists_what_is_there(tmp_path):
    with pytest.raises(UserError) as raised:
        find_split_files(tmp_path / "absent", "val")
    assert str(raised.value) == f"--vqa-dir {tmp_path / 'absent'} does not exist"
    write_split(tmp_path)
    (tmp_path / "notes.JSON").write_text("{}")  # not *.json: not listed
    (tmp_path / "b_test_extra.json").write_text("{}")
    with pytest.raises(UserError) as raised:
        find_split_files(tmp_path, "test")
    assert str(raised.value) == (
        f"expected one *_test_questions.json in {tmp_path}, found 0; JSON files there: "
        "['b_test_extra.json', 'v2_OpenEnded_synth_val_questions.json', "
        "'v2_synth_val_annotations.json']")


def _drop(doc: dict, key: str) -> dict:
    return {k: v for k, v in doc.items() if k != key}


BAD_SPLITS = {  # name -> (edit of (questions, annotations), message with {q} and {a} paths)
    "questions not JSON": (lambda q, a: ("[", a), "VQA questions file {q} is not valid JSON"),
    "no questions field": (lambda q, a: (_drop(q, "questions"), a),
                           "{q}: missing field 'questions'"),
    "questions not a list": (lambda q, a: ({**q, "questions": {}}, a),
                             "{q}: field 'questions' should be list, got {{}}"),
    "no annotations field": (lambda q, a: (q, {}), "{a}: missing field 'annotations'"),
    "answer not a string": (
        lambda q, a: (q, {"annotations": [{**a["annotations"][0], "answers": [{"answer": 2}]}]}),
        "{a}: annotations[0].answers[0]: field 'answer' should be str, got 2"),
    "annotations not a list": (lambda q, a: (q, {"annotations": {}}),
                               "{a}: field 'annotations' should be list, got {{}}"),
    "annotation without a question id": (
        lambda q, a: (q, {"annotations": [_drop(a["annotations"][0], "question_id")]}),
        "{a}: annotations[0]: missing field 'question_id'"),
    "annotation question id not an int": (
        lambda q, a: (q, {"annotations": [{**a["annotations"][0], "question_id": "1"}]}),
        "{a}: annotations[0]: field 'question_id' should be int, got '1'"),
    "answers not a list": (
        lambda q, a: (q, {"annotations": [{**a["annotations"][0], "answers": "2"}]}),
        "{a}: annotations[0]: field 'answers' should be list, got '2'"),
    "no answers": (
        lambda q, a: (q, {"annotations": [{**a["annotations"][0], "answers": []}]}),
        "{a}: annotations[0]: 'answers' is empty"),
    "question type not a string": (
        lambda q, a: (q, {"annotations": [a["annotations"][1],
                                          {**a["annotations"][0], "question_type": 3}]}),
        "{a}: annotations[1]: field 'question_type' should be str, got 3"),
    "answer type not a string": (
        lambda q, a: (q, {"annotations": [{**a["annotations"][0], "answer_type": 1}]}),
        "{a}: annotations[0]: field 'answer_type' should be str, got 1"),
    "question without a question id": (
        lambda q, a: ({**q, "questions": [_drop(q["questions"][0], "question_id")]}, a),
        "{q}: questions[0]: missing field 'question_id'"),
    "question id not an int": (
        lambda q, a: ({**q, "questions": [{**q["questions"][0], "question_id": "1"}]}, a),
        "{q}: questions[0]: field 'question_id' should be int, got '1'"),
    "question text not a string": (
        lambda q, a: ({**q, "questions": [{**q["questions"][0], "question": 5}]}, a),
        "{q}: questions[0]: field 'question' should be str, got 5"),
    "no answer type": (
        lambda q, a: (q, {"annotations": [_drop(a["annotations"][0], "answer_type")]}),
        "{a}: annotations[0]: missing field 'answer_type'"),
    "empty split": (lambda q, a: ({**q, "questions": []}, a), "{q}: no questions (empty split)"),
    "question without an image id": (
        lambda q, a: ({**q, "questions": [_drop(q["questions"][0], "image_id")]}, a),
        "{q}: questions[0]: missing field 'image_id'"),
    "image id not an int": (
        lambda q, a: ({**q, "questions": [{**q["questions"][0], "image_id": "7"}]}, a),
        "{q}: questions[0]: field 'image_id' should be int, got '7'"),
    "a later image id not an int": (
        lambda q, a: ({**q, "questions": [q["questions"][0],
                                          {**q["questions"][1], "image_id": "9"}]}, a),
        "{q}: questions[1]: field 'image_id' should be int, got '9'"),
    "unannotated question": (
        lambda q, a: (q, {"annotations": a["annotations"][:1]}),
        "1 question(s) in {q} have no annotation in {a}, e.g. question_id [2]"),
}


@pytest.mark.parametrize("name", list(BAD_SPLITS))
def test_each_bad_split_is_refused_with_its_exact_message(tmp_path, name):
    edit, message = BAD_SPLITS[name]
    good_q, good_a = (json.loads(p.read_text()) for p in write_split(tmp_path / "good"))
    questions, annotations = edit(good_q, good_a)
    q_path, a_path = tmp_path / "q.json", tmp_path / "a.json"
    for path, doc in ((q_path, questions), (a_path, annotations)):
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, tmp_path / "good")
    assert str(raised.value).startswith(message.format(q=q_path, a=a_path))


def test_every_unannotated_question_is_counted_and_the_first_three_named(tmp_path):
    q_path, a_path = write_split(tmp_path)
    questions = json.loads(q_path.read_text())
    first, second = questions["questions"]
    extra = [{**first, "question_id": qid} for qid in (3, 4, 5)]
    q_path.write_text(json.dumps({**questions, "questions": [first, second, *extra]}))
    annotations = json.loads(a_path.read_text())
    a_path.write_text(json.dumps({"annotations": annotations["annotations"][1:]}))  # only 2
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, tmp_path)
    assert str(raised.value) == (f"4 question(s) in {q_path} have no annotation in {a_path}, "
                                 "e.g. question_id [1, 3, 4]")


def test_a_split_without_a_data_subtype_finds_images_under_an_empty_one(tmp_path):
    q_path, a_path = write_split(tmp_path)
    questions = json.loads(q_path.read_text())
    q_path.write_text(json.dumps(_drop(questions, "data_subtype")))
    for image in (tmp_path / "images" / "val").iterdir():
        image.rename(tmp_path / "images" / image.name)
    examples = load_vqa_split(q_path, a_path, tmp_path)
    assert examples[0].image.path == str(tmp_path / "images" / "000000000007.jpg")


def test_an_explicit_pattern_that_climbs_out_names_the_question(tmp_path):
    q_path, a_path = write_split(tmp_path)
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, tmp_path, image_pattern="../{image_id}.jpg")
    assert str(raised.value).startswith(
        f"{q_path}: questions[0]: image path '../7.jpg' leads outside the image root {tmp_path};")


def test_missing_files_and_images_name_what_is_missing(tmp_path):
    q_path, a_path = write_split(tmp_path)
    with pytest.raises(UserError) as raised:
        load_vqa_split(tmp_path / "none.json", a_path, tmp_path)
    assert str(raised.value) == f"VQA questions file not found: {tmp_path / 'none.json'}"
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, tmp_path / "none.json", tmp_path)
    assert str(raised.value) == f"VQA annotations file not found: {tmp_path / 'none.json'}"
    (tmp_path / "images" / "val" / "000000000009.jpg").unlink()
    image = tmp_path / "images" / "val" / "000000000009.jpg"
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, tmp_path)
    assert str(raised.value) == (
        f"1 image file(s) missing for {q_path} (image root {tmp_path}), e.g. {image}")


def test_a_data_subtype_that_climbs_out_of_the_image_root_is_refused(tmp_path):
    q_path, a_path = write_split(tmp_path)
    questions = json.loads(q_path.read_text())
    q_path.write_text(json.dumps({**questions, "data_subtype": "../../val"}))
    root = tmp_path / "images"
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, root)
    assert str(raised.value) == (
        f"{q_path}: data_subtype '../../val', questions[0]: image path "
        f"'images/../../val/000000000007.jpg' leads outside the image root {root}; paths in "
        "annotation files must stay under the image root (pass a common parent as the root)")


def test_images_in_neither_layout_name_both_places_tried(tmp_path):
    q_path, a_path = write_split(tmp_path, images=())
    with pytest.raises(UserError) as raised:
        load_vqa_split(q_path, a_path, tmp_path)
    tried = [str(tmp_path / "images/val/000000000007.jpg"),
             str(tmp_path / "val/COCO_val_000000000007.jpg")]
    assert str(raised.value) == (
        f"no image for question 0 of {q_path}; tried {tried}. Pass image_pattern (e.g. "
        "'{split}/COCO_{split}_{image_id:012d}.jpg') or the right image root")
    # COCO's layout is found as well
    (tmp_path / "val").mkdir()
    for image_id in (7, 9):
        (tmp_path / "val" / f"COCO_val_{image_id:012d}.jpg").write_bytes(b"")
    examples = load_vqa_split(q_path, a_path, tmp_path)
    assert examples[1].image.path == str(tmp_path / "val" / "COCO_val_000000000009.jpg")
