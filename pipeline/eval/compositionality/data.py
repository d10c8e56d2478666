"""Edited-caption test sets: SugarCrepe's layout, ARO's, and the synthetic world's.

Each set is a list of (image, true caption, edited caption) items, one set per kind of edit:
- SugarCrepe: a folder of `{kind}.json` files (or one of them), each {id: {"filename",
  "caption", "negative_caption"}}, filenames under the image root (COCO val2017 for the real one;
  the synthetic world writes its edits in this layout).
- ARO (VG-Relation, VG-Attribution): one JSON list of {"image_path", "true_caption",
  "false_caption"}, all one kind, named after the file. ARO crops each image to the box of the
  relation (bbox_x/y/w/h); the crop is applied here too.
Every image is checked to exist before any model work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.images import path_under


@dataclass(frozen=True)
class EditedItem:
    image: Path
    caption: str
    negative: str
    box: tuple[int, int, int, int] | None = None  # (left, top, right, bottom), ARO's crop


def load_edit_sets(path: str | Path, image_root: str | Path) -> dict[str, list[EditedItem]]:
    """{kind: items} from a SugarCrepe folder or file, or an ARO JSON list."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no edited-caption JSON files (SugarCrepe's {{kind}}.json)")
    sets = {}
    for file in files:
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {file}: {exc}") from exc
        items = _items(raw, file, image_root)
        if not items:
            raise UserError(f"{file}: no items")
        sets[file.stem] = items
    return sets


def _items(raw, file: Path, image_root) -> list[EditedItem]:
    if isinstance(raw, dict):  # SugarCrepe
        rows = [(r.get("filename"), r.get("caption"), r.get("negative_caption"), None)
                for r in raw.values()]
    elif isinstance(raw, list):  # ARO
        rows = [(r.get("image_path"), r.get("true_caption"), r.get("false_caption"), _box(r))
                for r in raw]
    else:
        raise UserError(f"{file}: expected SugarCrepe's {{id: {{filename, caption, "
                        "negative_caption}} or ARO's list of {image_path, true_caption, "
                        "false_caption}")
    items = []
    for n, (name, caption, negative, box) in enumerate(rows):
        if not all(isinstance(v, str) and v for v in (name, caption, negative)):
            raise UserError(f"{file}: item {n} lacks an image name, a caption or an edited one")
        image = path_under(image_root, name, str(file))
        if not image.is_file():
            raise UserError(f"{file}: item {n}: image {image} not found (check --image-root)")
        items.append(EditedItem(image, caption, negative, box))
    return items


def _box(row: dict) -> tuple[int, int, int, int] | None:
    keys = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
    if not all(k in row for k in keys):
        return None
    x, y, w, h = (int(row[k]) for k in keys)
    return (x, y, x + w, y + h)
