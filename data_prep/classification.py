"""The synthetic world's classification sets: single-object scenes labelled by the object's
shape (one task) and colour (another), each in the two layouts users have:

    classification/TASK/imagefolder/{train,val,test}/<class>/NNNNNN.jpg       ImageFolder
    classification/TASK/wds/{train,val,test}/{0..N-1}.tar + nshards.txt       CLIP_benchmark's
    classification/TASK/wds/classnames.txt                                    webdataset layout
    classification/TASK/{imagefolder,wds}/zeroshot_classification_templates.txt

Both tasks label the same images. Shape and colour cycle through their lists (image i has shape
i mod S and colour i mod C), so every class has images in every split of at least max(S, C)
images; size and grid cell are random. Each image is a new rendering from its own random stream
(seed, split, index), never one of the training images.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds

from vlp.data_prep.scenes import GRID, Obj, Scene, WorldSpec, render_scene
from vlp.pipeline.data.errors import UserError

SPLITS = ("train", "val", "test")
SAMPLES_PER_SHARD = 256
# Random streams (seed, STREAM, split, index): four entries, so never one of synth.py's streams.
STREAM = 100
# Prompts in the world's caption vocabulary. Shape prompts vary size; colour prompts name every
# shape, so a colour's embedding averages over shapes (prompt ensembling).
TEMPLATES = {
    "shape": ("a {c}", "a small {c}", "a big {c}", "there is a {c}", "a picture of a {c}",
              "one shape: a {c}"),
    "colour": tuple(f"a {size} {{c}} {shape}" for size in ("small", "big")
                    for shape in ("circle", "square", "triangle", "cross", "diamond")),
}


def classification_counts(n: int | None, n_test: int, spec: WorldSpec) -> dict[str, int]:
    """Images per split: n for train and test, n // 2 for validation, where n defaults to
    n_test // 2 and at least twice the largest class list (every split holds every class)."""
    smallest = 2 * max(len(spec.shapes), len(spec.colours))
    n = max(n_test // 2, smallest) if n is None else n
    if n < smallest:
        raise UserError(f"classification sets need at least {smallest} images (each split needs "
                        f"one per class; validation gets half), got {n}")
    return {"train": n, "val": n // 2, "test": n}


def classification_scenes(n: int, spec: WorldSpec, rng: np.random.Generator) -> list[Scene]:
    sizes = rng.choice(spec.sizes, size=n)
    cells = rng.integers(0, GRID, size=(n, 2))
    return [
        Scene.of([Obj((int(cells[i, 0]), int(cells[i, 1])), spec.shapes[i % len(spec.shapes)],
                      spec.colours[i % len(spec.colours)], str(sizes[i]))])
        for i in range(n)
    ]


def write_classification(out: Path, counts: dict[str, int], spec: WorldSpec, seed: int,
                         size: int) -> dict:
    """Render the classification sets under OUT/classification; return world.json's entry."""
    classes = {"shape": list(spec.shapes), "colour": list(spec.colours)}
    roots = {task: {layout: out / "classification" / task / layout
                    for layout in ("imagefolder", "wds")} for task in classes}
    for task, layouts in roots.items():
        for root in layouts.values():
            root.mkdir(parents=True)
            (root / "zeroshot_classification_templates.txt").write_text(
                "\n".join(TEMPLATES[task]) + "\n")
        # The shards' labels index this list; ImageFolder's classes are its folder names.
        (layouts["wds"] / "classnames.txt").write_text("\n".join(classes[task]) + "\n")
    for split_index, split in enumerate(SPLITS):
        scenes = classification_scenes(
            counts[split], spec, np.random.default_rng([seed, STREAM, split_index]))
        jpegs = [_jpeg(scene, np.random.default_rng([seed, STREAM, split_index, i]), size)
                 for i, scene in enumerate(scenes)]
        for task, layouts in roots.items():
            labels = [getattr(scene.objects[0], task) for scene in scenes]
            _write_image_folder(layouts["imagefolder"] / split, jpegs, labels)
            _write_shards(layouts["wds"] / split, jpegs, [classes[task].index(c) for c in labels])
    return {
        "counts": counts,
        "classes": classes,
        "files": {task: {layout: str(root.relative_to(out)) for layout, root in layouts.items()}
                  for task, layouts in roots.items()},
    }


def _jpeg(scene: Scene, rng: np.random.Generator, size: int) -> bytes:
    buffer = io.BytesIO()
    render_scene(scene, rng, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_image_folder(split_dir: Path, jpegs: list[bytes], labels: list[str]) -> None:
    for i, (jpeg, label) in enumerate(zip(jpegs, labels)):
        path = split_dir / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)


def _write_shards(split_dir: Path, jpegs: list[bytes], labels: list[int]) -> None:
    """CLIP_benchmark's layout: {0..N-1}.tar with s%07d keys, .jpg + .cls (label as text)."""
    split_dir.mkdir(parents=True)
    shards = range(0, len(jpegs), SAMPLES_PER_SHARD)
    for shard, lo in enumerate(shards):
        with wds.TarWriter(str(split_dir / f"{shard}.tar"), encoder=False, mtime=0) as sink:
            for i in range(lo, min(lo + SAMPLES_PER_SHARD, len(jpegs))):
                label = str(labels[i]).encode()
                sink.write({"__key__": f"s{i:07d}", "jpg": jpegs[i], "cls": label})
    (split_dir / "nshards.txt").write_text(f"{len(shards)}\n")
