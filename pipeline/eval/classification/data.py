"""Classification sets in the two layouts users have, read to one `ClassificationSet`.

    DATASET/SPLIT/<class>/<image>          ImageFolder (torchvision's rules: classes are the
                                           sorted folder names, images anywhere below them)
    DATASET/SPLIT/{0..N-1}.tar             CLIP_benchmark's webdataset layout: per sample an
    DATASET/SPLIT/nshards.txt              image (webp/png/jpg/jpeg) and a `cls` member holding
                                           the label as text
    DATASET/classnames.txt                 one class name per line, in label order
    DATASET/zeroshot_classification_templates.txt   one prompt per line, `{c}` for the class

classnames.txt is required for shards and optional for ImageFolder (the folder names otherwise).
Images are not read here: a file, or a byte range of a tar, per image. Every structural problem
(no classes, an empty class folder, a label out of range, a sample without image) is a UserError
before any model work; an image that does not decode is skipped and counted when it is encoded.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS
from vlp.pipeline.eval.images import ImageRef, tar_samples

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass
class ClassificationSet:
    images: list[ImageRef]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None  # the dataset's own prompt templates, when it ships them
    source: str

    def __post_init__(self):
        if not self.images:
            raise UserError(f"{self.source}: no images")


def load_classification(
    dataset: str | Path, split: str = "test", classnames: str | Path | None = None
) -> ClassificationSet:
    """DATASET/SPLIT in either layout (shards if it holds any .tar, else ImageFolder).
    `classnames` names a class-names file to use instead of DATASET/classnames.txt."""
    dataset = Path(dataset)
    split_dir = dataset / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in dataset.glob("*") if p.is_dir())
        raise UserError(f"classification split {split_dir} not found (splits present: {present}); "
                        "expected DATASET/SPLIT/<class>/<image> or DATASET/SPLIT/*.tar")
    names_file = Path(classnames) if classnames is not None else dataset / CLASSNAMES_FILE
    names = read_lines(names_file, "class names") if classnames or names_file.is_file() else None
    templates_file = dataset / TEMPLATES_FILE
    templates = read_templates(templates_file) if templates_file.is_file() else None
    if list(split_dir.glob("*.tar")):
        if names is None:
            raise UserError(f"{dataset} has no {CLASSNAMES_FILE} (one class name per line, in "
                            "label order); CLIP_benchmark's webdataset layout needs it, or pass "
                            "a class-names file")
        images, labels = _read_shards(split_dir, len(names), names_file)
    else:
        folders, images, labels = _read_image_folder(split_dir)
        if names is None:
            names = folders
        elif len(names) != len(folders):
            raise UserError(f"{names_file} names {len(names)} classes but {split_dir} has "
                            f"{len(folders)} class folders")
    return ClassificationSet(images, labels, names, templates, source=str(split_dir))


def read_lines(path: str | Path, what: str) -> list[str]:
    """Stripped non-empty lines of a UTF-8 text file; a blank line between entries is an error
    (it would shift every label after it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} file {path} is not UTF-8 text: {exc}") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines or not all(lines):
        where = "is empty" if not lines else f"has a blank line (line {lines.index('') + 1})"
        raise UserError(f"{what} file {path} {where}; write one entry per line")
    return lines


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with `{c}` where the class name goes."""
    templates = read_lines(path, "prompt templates")
    for line, template in enumerate(templates, 1):
        check_template(template, f"{path}:{line}")
    return templates


def check_template(template: str, where: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"{where}: template {template!r} is malformed: {exc}") from exc
    if fields != ["c"]:
        raise UserError(f"{where}: template {template!r} must contain {{c}} exactly once (where "
                        "the class name goes) and no other {...} field; write {{ }} for braces")


def _read_image_folder(root: Path) -> tuple[list[str], list[ImageRef], list[int]]:
    """Class folder names (sorted), images and their labels. Hidden folders are not classes."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root} has no class folders; an ImageFolder tree is ROOT/<class>/<image>")
    images, labels, empty = [], [], []
    for label, name in enumerate(folders):
        files = sorted(
            os.path.join(directory, file)
            for directory, _, files in os.walk(root / name, followlinks=True)
            for file in files
            if file.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        images += [ImageRef(file) for file in files]
        labels += [label] * len(files)
    if empty:
        raise UserError(f"{root}: class folder(s) {empty[:5]} hold no images "
                        f"({'/'.join(IMAGE_EXTENSIONS)}); every class needs at least one, or "
                        "remove the folder (labels are the sorted folder names)")
    return folders, images, labels


def _read_shards(split_dir: Path, num_classes: int, names_file: Path):
    """Images and labels of the split's shards: {0..N-1}.tar per nshards.txt, else every *.tar
    in name order."""
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not (text.isascii() and text.isdigit()):
            raise UserError(f"{count_file} should hold the number of shards, got {text!r:.40}")
        shards = [split_dir / f"{i}.tar" for i in range(int(text))]
    else:
        shards = sorted(split_dir.glob("*.tar"))
    images, labels = [], []
    for shard in shards:
        for key, image, members in tar_samples(shard, frozenset({"cls"})):
            where = f"{shard}: sample {key!r}"
            if image is None:
                raise UserError(f"{where} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
            if "cls" not in members:
                raise UserError(f"{where} has no .cls member (its label)")
            text = members["cls"].decode("utf-8", "replace").strip()
            if not (text.isascii() and text.isdigit()):
                raise UserError(f"{where}: its .cls member should be the label as a number, "
                                f"got {text!r:.40}")
            if int(text) >= num_classes:
                raise UserError(f"{where} has label {text}, but {names_file} names only "
                                f"{num_classes} classes (labels count from 0)")
            images.append(image)
            labels.append(int(text))
    return images, labels
