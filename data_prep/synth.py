"""Write the synthetic world in the real formats: an img2dataset URL list for pretraining, a
Karpathy-style retrieval test set, a Karpathy JSON of the whole world for captioning (its training
images with their captions, and the retrieval test set as the test split), VQAv2
question/annotation files, and classification sets in ImageFolder and CLIP_benchmark webdataset
layouts (classification.py).

Held-out scenes (retrieval test, VQA val) are drawn first and are unique; training scenes (URL
list, VQA train) are drawn excluding them, so no scene appears on both sides. Each image's pixels
and texts come from its own random stream (seed, split, index): the world is deterministic.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from vlp.data_prep.captions import TEMPLATES, captions
from vlp.data_prep.classification import classification_counts, write_classification
from vlp.data_prep.compositionality import (
    DIRECTORY as COMPOSITIONALITY_DIR,
    write_compositionality,
    write_lexicon,
)
from vlp.data_prep.scenes import COLOURS, GRID, Scene, WorldSpec, render_scene, sample_scenes
from vlp.data_prep.vqa import annotation, ask
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.progress import tracked

RETRIEVAL_CAPTIONS = 5
CAPTION_JSON = "dataset_synth.json"  # at the world's root, which is its image root
VQA_IMAGE_PATTERN = "vqa/images/{split}/{image_id:012d}.jpg"
SPLIT_STREAMS = {"train": 0, "retrieval": 1, "vqa_train": 2, "vqa_val": 3}


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


def _prepare_dir(out: Path) -> None:
    """Create `out`; replace a previous world there, refuse to write over anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").exists():
            raise UserError(f"{out} is not empty and holds no world.json; choose another")
        for sub in ("train", "retrieval", "vqa", "classification", COMPOSITIONALITY_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / CAPTION_JSON).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _render(scenes: list[Scene], paths: list[Path], seed: int, split: str, size: int):
    """Render scenes to JPEG files; yield each scene with its image's random stream."""
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for index, (scene, path) in enumerate(tracked(list(zip(scenes, paths)), f"render {split}",
                                                  "image")):
        rng = _image_rng(seed, split, index)
        render_scene(scene, rng, size).save(path, format="JPEG", quality=90)
        yield scene, rng


def _write_train(out, scenes, seed, base_url, size) -> list[str]:
    """Render the training images and write their URL list; returns their captions."""
    names = [f"train/images/{i:06d}.jpg" for i in range(len(scenes))]
    texts = [
        captions(scene, rng, 1)[0]
        for scene, rng in _render(scenes, [out / n for n in names], seed, "train", size)
    ]
    urls = [f"{base_url}/{name}" for name in names]
    pd.DataFrame({"url": urls, "caption": texts}).to_parquet(out / "train/url_list.parquet")
    return texts


def _karpathy_image(filepath: str, filename: str, split: str, imgid: int, first_sentid: int,
                    raws: list[str]) -> dict:
    sentids = list(range(first_sentid, first_sentid + len(raws)))
    sentences = [
        {"raw": raw, "tokens": re.findall(r"[a-z0-9]+", raw), "imgid": imgid, "sentid": s}
        for raw, s in zip(raws, sentids)
    ]
    return {"filename": filename, "filepath": filepath, "split": split, "imgid": imgid,
            "sentids": sentids, "sentences": sentences}


def _write_retrieval(out, scenes, seed, size) -> list[list[str]]:
    """Render the retrieval test images and write their Karpathy JSON; returns their captions."""
    paths = [out / f"retrieval/images/{i:06d}.jpg" for i in range(len(scenes))]
    images, texts = [], []
    for imgid, (scene, rng) in enumerate(_render(scenes, paths, seed, "retrieval", size)):
        texts.append(captions(scene, rng, RETRIEVAL_CAPTIONS))
        images.append(_karpathy_image("images", paths[imgid].name, "test", imgid,
                                      imgid * RETRIEVAL_CAPTIONS, texts[-1]))
    with open(out / "retrieval/dataset_synth.json", "w") as f:
        json.dump({"images": images, "dataset": "synth"}, f)
    return texts


def _write_captioning(out, train_texts: list[str], test_texts: list[list[str]]) -> None:
    """CAPTION_JSON, COCO's Karpathy layout with the world as image root: split "train" is the
    training images with their one caption, split "test" the retrieval test images with their
    five (the captioning test set)."""
    images = [_karpathy_image("train/images", f"{i:06d}.jpg", "train", i, i, [raw])
              for i, raw in enumerate(train_texts)]
    sentid = len(train_texts)
    for i, raws in enumerate(test_texts):
        images.append(_karpathy_image("retrieval/images", f"{i:06d}.jpg", "test",
                                      len(train_texts) + i, sentid, raws))
        sentid += len(raws)
    with open(out / CAPTION_JSON, "w") as f:
        json.dump({"images": images, "dataset": "synth"}, f)


def _write_vqa(out, split, scenes, first_image_id, spec, seed, size) -> dict:
    image_ids = [first_image_id + i for i in range(len(scenes))]
    paths = [out / VQA_IMAGE_PATTERN.format(split=split, image_id=i) for i in image_ids]
    questions, annotations = [], []
    rendered = _render(scenes, paths, seed, f"vqa_{split}", size)
    for image_id, (scene, rng) in zip(image_ids, rendered):
        for j, question in enumerate(ask(scene, spec, rng, spec.questions_per_image)):
            question_id = image_id * 1000 + j
            questions.append(
                {"image_id": image_id, "question": question.question, "question_id": question_id}
            )
            annotations.append(annotation(question, question_id, image_id, rng))
    files = {
        "questions": f"vqa/v2_OpenEnded_synth_{split}_questions.json",
        "annotations": f"vqa/v2_synth_{split}_annotations.json",
    }
    header = {"data_type": "synth", "data_subtype": split, "license": {"name": "CC0"}}
    with open(out / files["questions"], "w") as f:
        json.dump({**header, "task_type": "Open-Ended", "questions": questions}, f)
    with open(out / files["annotations"], "w") as f:
        json.dump({**header, "annotations": annotations}, f)
    return {**files, "images": len(scenes), "num_questions": len(questions)}


def draw_scenes(seed, spec, n_train, n_test, n_vqa_train, n_vqa_val) -> dict[str, list[Scene]]:
    """The scenes of every split; held-out ones unique and never among the training ones."""
    rng = np.random.default_rng(seed)
    test = sample_scenes(rng, spec, n_test, set(), unique=True)
    vqa_val = sample_scenes(rng, spec, n_vqa_val, set(test), unique=True)
    held_out = set(test) | set(vqa_val)
    return {
        "test": test,
        "vqa_val": vqa_val,
        "train": sample_scenes(rng, spec, n_train, held_out, unique=False),
        "vqa_train": sample_scenes(rng, spec, n_vqa_train, held_out, unique=False),
    }


def generate_world(
    out_dir,
    n_train: int,
    n_test: int,
    seed: int = 0,
    base_url: str = "http://127.0.0.1:8765",
    n_vqa_train: int | None = None,
    n_vqa_val: int | None = None,
    render_size: int = 128,
    spec: WorldSpec | None = None,
    n_classify: int | None = None,
) -> dict:
    """Render the world into `out_dir` and return what world.json records.

    `n_vqa_train`/`n_vqa_val` count VQA images (default n_train // 2 and n_test // 2), each with
    up to spec.questions_per_image questions. `n_classify` counts the classification sets'
    training and test images (see classification.py; default n_test // 2).
    """
    spec = spec or WorldSpec()
    n_vqa_train = n_train // 2 if n_vqa_train is None else n_vqa_train
    n_vqa_val = n_test // 2 if n_vqa_val is None else n_vqa_val
    if min(n_train, n_test, n_vqa_train, n_vqa_val) < 1:
        raise UserError("every split needs at least one image")
    classify_counts = classification_counts(n_classify, n_test, spec)
    out = Path(out_dir)
    base_url = base_url.rstrip("/")
    _prepare_dir(out)

    scenes = draw_scenes(seed, spec, n_train, n_test, n_vqa_train, n_vqa_val)
    train_texts = _write_train(out, scenes["train"], seed, base_url, render_size)
    _write_captioning(out, train_texts, _write_retrieval(out, scenes["test"], seed, render_size))
    compositionality = write_compositionality(
        out, scenes["test"], [f"retrieval/images/{i:06d}.jpg" for i in range(n_test)], spec, seed)
    write_lexicon(out, spec)
    vqa = {
        "train": _write_vqa(out, "train", scenes["vqa_train"], 1, spec, seed, render_size),
        "val": _write_vqa(out, "val", scenes["vqa_val"], 1 + n_vqa_train, spec, seed, render_size),
    }
    classification = write_classification(out, classify_counts, spec, seed, render_size)
    world = {
        "seed": seed,
        "base_url": base_url,
        "render_size": render_size,
        "counts": {
            "train": n_train, "test": n_test, "vqa_train": n_vqa_train, "vqa_val": n_vqa_val,
        },  # fmt: skip
        "attributes": {
            "shapes": list(spec.shapes),
            "colours": {name: list(COLOURS[name]) for name in spec.colours},
            "sizes": list(spec.sizes),
            "grid": GRID,
            "object_count_weights": list(spec.object_count_weights),
            "questions_per_image": spec.questions_per_image,
            "caption_templates": len(TEMPLATES),
        },
        "files": {
            "train_images": "train/images",
            "train_url_list": "train/url_list.parquet",
            "retrieval_json": "retrieval/dataset_synth.json",
            "retrieval_image_root": "retrieval",
            "caption_json": CAPTION_JSON,
            "caption_image_root": ".",
            "vqa_image_pattern": VQA_IMAGE_PATTERN,
            "vqa": vqa,
            "compositionality": COMPOSITIONALITY_DIR,  # image root: the world
            "lexicon": "lexicon.json",
        },
        "compositionality": compositionality,
        "classification": classification,
    }
    with open(out / "world.json", "w") as f:
        json.dump(world, f, indent=2)
    return world
