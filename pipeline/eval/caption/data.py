"""Captioning data: a Karpathy-split JSON (COCO/Flickr30k layout) and its image root.

The test split needs reference captions for every image (several, as in COCO's five) and unique
image ids (COCO's results format is keyed by them); the training splits give the (image, caption)
pairs of the fine-tune and the captions of the baselines.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.images import ImageRef
from vlp.pipeline.eval.karpathy import KarpathyImage, read_karpathy


def load_test_split(json_path: str | Path, image_root: str | Path,
                    split: str) -> list[KarpathyImage]:
    """The images of `split`, each with its references; an error names what is missing."""
    images = read_karpathy(json_path, image_root, [split])
    unreferenced = [str(image.image) for image in images if not image.sentences]
    if unreferenced:
        raise UserError(
            f"{json_path}: {len(unreferenced)} of the {len(images)} images of split {split!r} "
            f"have no reference captions ('sentences'), e.g. {unreferenced[:3]}; captioning "
            "is scored against references, so every test image needs them"
        )
    repeated = [i for i, n in Counter(image.image_id for image in images).items() if n > 1]
    if repeated:
        raise UserError(f"{json_path}: split {split!r} repeats image ids {repeated[:5]} "
                        "(cocoid/imgid); each test image needs its own")
    return images


def load_train_pairs(json_path: str | Path, image_root: str | Path,
                     splits: Sequence[str]) -> list[tuple[ImageRef, str]]:
    """Every (image, caption) pair of the training splits that are present (COCO's Karpathy
    training set is `train` + `restval`)."""
    images = read_karpathy(json_path, image_root, splits)
    pairs = [(image.image, sentence) for image in images for sentence in image.sentences]
    if not pairs:
        raise UserError(f"{json_path}: the images of split(s) {list(splits)} have no captions "
                        "('sentences'); the fine-tune and the baselines need them")
    return pairs
