"""The synthetic world: layout and formats, determinism, split disjointness, honest captions and
answers."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlp.data_prep.captions import (
    COLOUR_WORDS,
    MAX_CAPTION_TOKENS,
    NUMBER_WORDS,
    POSITION_PHRASES,
    SIZE_WORDS,
    TEMPLATES,
    captions,
)
from vlp.data_prep.scenes import COLOURS, SHAPES, WorldSpec, sample_scene
from vlp.data_prep.synth import draw_scenes, generate_world
from vlp.pipeline.data.errors import UserError


def load(path: Path):
    return json.loads(path.read_text())


def world_scenes(world_dir):
    world = load(world_dir / "world.json")
    counts = world["counts"]
    return draw_scenes(world["seed"], WorldSpec(), *counts.values())


def test_world_layout_and_formats(world_dir):
    world = load(world_dir / "world.json")
    assert world["counts"] == {"train": 160, "test": 32, "vqa_train": 80, "vqa_val": 16}

    url_list = pd.read_parquet(world_dir / world["files"]["train_url_list"])
    assert list(url_list.columns) == ["url", "caption"] and len(url_list) == 160
    assert url_list.url[0] == f"{world['base_url']}/train/images/000000.jpg"
    assert Image.open(world_dir / "train/images/000000.jpg").size == (128, 128)

    karpathy = load(world_dir / world["files"]["retrieval_json"])
    assert karpathy["dataset"] == "synth" and len(karpathy["images"]) == 32
    first = karpathy["images"][0]
    root = world_dir / world["files"]["retrieval_image_root"]
    assert (root / first["filepath"] / first["filename"]).is_file()
    assert first["split"] == "test" and len(first["sentences"]) == 5
    assert [s["sentid"] for s in first["sentences"]] == first["sentids"]
    assert len({s["raw"] for s in first["sentences"]}) == 5

    for split, vqa in world["files"]["vqa"].items():
        questions = load(world_dir / vqa["questions"])["questions"]
        annotations = load(world_dir / vqa["annotations"])["annotations"]
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
        assert len({q["question_id"] for q in questions}) == len(questions) == vqa["num_questions"]
        for record in annotations:
            assert [a["answer_id"] for a in record["answers"]] == list(range(1, 11))
            image = world_dir / world["files"]["vqa_image_pattern"].format(
                split=split, image_id=record["image_id"]
            )
            assert image.is_file()
        assert {a["answer_type"] for a in annotations} == {"yes/no", "number", "other"}


def test_caption_json_is_the_world_in_cocos_karpathy_layout(world_dir):
    """Training images with their URL-list caption, and the retrieval test set (the same images
    and 5 references) as the test split; every path resolves under the world, ids are unique."""
    world = load(world_dir / "world.json")
    caption = load(world_dir / world["files"]["caption_json"])
    root = world_dir / world["files"]["caption_image_root"]
    train = [image for image in caption["images"] if image["split"] == "train"]
    test = [image for image in caption["images"] if image["split"] == "test"]
    assert (len(train), len(test)) == (160, 32) and len(caption["images"]) == 192
    url_list = pd.read_parquet(world_dir / world["files"]["train_url_list"])
    assert [image["sentences"][0]["raw"] for image in train] == url_list.caption.tolist()
    assert all(len(image["sentences"]) == 1 for image in train)
    retrieval = load(world_dir / world["files"]["retrieval_json"])["images"]
    assert [[s["raw"] for s in image["sentences"]] for image in test] == [
        [s["raw"] for s in image["sentences"]] for image in retrieval]
    for image in caption["images"]:
        assert (root / image["filepath"] / image["filename"]).is_file()
    assert len({image["imgid"] for image in caption["images"]}) == 192
    sentids = [s["sentid"] for image in caption["images"] for s in image["sentences"]]
    assert len(set(sentids)) == len(sentids) == 160 + 32 * 5
    # The splits are the world's training and retrieval images, whose scenes are disjoint
    # (test_held_out_scenes_never_appear_in_training).
    assert {i["filepath"] for i in train} == {"train/images"}
    assert {i["filepath"] for i in test} == {"retrieval/images"}


def test_classification_sets_in_both_layouts_and_never_training_images(world_dir):
    def digests(paths):
        return {hashlib.sha256(p.read_bytes()).digest() for p in paths}

    entry = load(world_dir / "world.json")["classification"]
    assert entry["counts"] == {"train": 16, "val": 8, "test": 16}  # default: test // 2
    assert entry["classes"] == {"shape": list(SHAPES), "colour": list(COLOURS)}
    other_images = digests(p for p in world_dir.rglob("*.jpg") if "classification" not in p.parts)
    for task, layouts in entry["files"].items():
        shards, folders = world_dir / layouts["wds"], world_dir / layouts["imagefolder"]
        assert (shards / "classnames.txt").read_text().split() == entry["classes"][task]
        assert "{c}" in (folders / "zeroshot_classification_templates.txt").read_text()
        for split, count in entry["counts"].items():
            assert (shards / split / "nshards.txt").read_text() == "1\n"
            assert (shards / split / "0.tar").is_file()
            images = sorted((folders / split).glob("*/*.jpg"))
            assert len(images) == count
            assert {p.parent.name for p in images} == set(entry["classes"][task])  # all classes
            assert not digests(images) & other_images


def test_world_is_deterministic_from_the_seed(tmp_path):
    def digest(world_dir):
        files = sorted(p for p in world_dir.rglob("*") if p.is_file())
        return {p.relative_to(world_dir): hashlib.sha256(p.read_bytes()).digest() for p in files}

    first = generate_world(tmp_path / "a", 12, 6, seed=3)
    again = generate_world(tmp_path / "b", 12, 6, seed=3)
    other = generate_world(tmp_path / "c", 12, 6, seed=4)
    assert first == again and digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "c") != digest(tmp_path / "a") and other["seed"] == 4


def test_generate_world_refuses_a_directory_that_is_not_a_world(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="no world.json"):
        generate_world(tmp_path, 4, 2)


def test_held_out_scenes_never_appear_in_training(world_dir):
    scenes = world_scenes(world_dir)
    held_out = set(scenes["test"]) | set(scenes["vqa_val"])
    assert len(set(scenes["test"])) == 32  # no duplicates inside the test set either
    assert not held_out & (set(scenes["train"]) | set(scenes["vqa_train"]))


def test_every_caption_names_every_object(world_dir):
    scenes = world_scenes(world_dir)["test"]
    karpathy = load(world_dir / "retrieval/dataset_synth.json")
    for scene, image in zip(scenes, karpathy["images"]):
        for sentence in image["sentences"]:
            raw = sentence["raw"]
            for obj in scene.objects:
                assert obj.shape in raw
                assert any(w in raw for w in COLOUR_WORDS.get(obj.colour, (obj.colour,)))
                assert any(w in raw for w in SIZE_WORDS[obj.size])
                assert any(p in raw for p in POSITION_PHRASES[obj.cell])


def test_captions_fit_a_32_token_text_encoder():
    rng = np.random.default_rng(0)
    three = WorldSpec(object_count_weights=(0, 0, 1))
    lengths = [
        len(re.findall(r"[a-z]+|[^\sa-z]", text))
        for _ in range(300)
        for text in captions(sample_scene(rng, three), rng, len(TEMPLATES))
    ]
    assert max(lengths) <= MAX_CAPTION_TOKENS


def test_vqa_answers_are_true_noisy_and_balanced(world_dir):
    scenes = world_scenes(world_dir)
    annotations, questions = [], {}
    for split in ("train", "val"):
        annotations += load(world_dir / f"vqa/v2_synth_{split}_annotations.json")["annotations"]
        for q in load(world_dir / f"vqa/v2_OpenEnded_synth_{split}_questions.json")["questions"]:
            questions[q["question_id"]] = q["question"]
    scene_of = dict(enumerate(scenes["vqa_train"] + scenes["vqa_val"], start=1))

    yes_no = Counter()
    all_answers = Counter()
    for record in annotations:
        question, scene = questions[record["question_id"]], scene_of[record["image_id"]]
        all_answers.update(a["answer"] for a in record["answers"])
        if question in ("how many shapes are there?", "how many objects are there?"):
            count = len(scene.objects)
            assert record["multiple_choice_answer"] in (str(count), NUMBER_WORDS[count])
        if question.startswith("is there"):
            colour, shape = question.rstrip("?").split()[-2:]
            colour = "grey" if colour == "gray" else colour
            truth = any((o.colour, o.shape) == (colour, shape) for o in scene.objects)
            assert record["multiple_choice_answer"] == ("yes" if truth else "no")
            yes_no[record["multiple_choice_answer"]] += 1
    assert 0.35 < yes_no["yes"] / sum(yes_no.values()) < 0.65
    assert all_answers["2"] > all_answers["two"] > 0  # synonyms among the ten answers
