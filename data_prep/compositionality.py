"""Minimally edited captions of the retrieval test images, for the compositionality evaluation,
and the world's word-class lexicon, for edited-caption negatives in training.

Each edit kind is one file in SugarCrepe's layout (`{kind}.json`: {id: {filename, caption,
negative_caption}}, filenames under the retrieval image root), so `vlp eval compositionality`
reads the world exactly as it reads SugarCrepe. The true and the edited caption are written from
the same template, object order and word choices, so they differ only in the edit:

    replace_colour / replace_size / replace_shape   one object's attribute changed
    move                                            one object moved to an empty cell
    swap_colour / swap_shape                        two objects exchange an attribute
    drop                                            one object left out (and the count word)

Edits are drawn from the scene, so they are exact: an edited caption is false of its image.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from vlp.data_prep.captions import COLOUR_WORDS, SIZE_WORDS, TEMPLATES
from vlp.data_prep.scenes import GRID, Obj, Scene, WorldSpec

EDIT_KINDS = ("replace_colour", "replace_size", "replace_shape", "move", "swap_colour",
              "swap_shape", "drop")
DIRECTORY = "compositionality"
LEXICON = "lexicon.json"
CHOICES = 64  # word choices replayed into a template: more than a 3-object caption makes


class ReplayRng:
    """Stands in for the generator a caption template draws from, replaying fixed choices, so
    two scenes described with the same choices get the same template words."""

    def __init__(self, values: np.ndarray):
        self.values, self.next = values, 0

    def integers(self, n: int) -> int:
        value = int(self.values[self.next]) % n
        self.next += 1
        return value


def edit_objects(objects: list[Obj], kind: str, spec: WorldSpec,
                 rng: np.random.Generator) -> list[Obj] | None:
    """`objects` (in caption order) with one edit of `kind`, or None where it does not apply."""
    n = len(objects)
    i = int(rng.integers(n))
    edited = list(objects)
    if kind.startswith("replace_"):
        attribute = kind.removeprefix("replace_")
        values = {"colour": spec.colours, "size": spec.sizes, "shape": spec.shapes}[attribute]
        current = getattr(objects[i], attribute)
        edited[i] = replace(objects[i], **{attribute: str(rng.choice(
            [v for v in values if v != current]))})
    elif kind == "move":
        empty = sorted({(r, c) for r in range(GRID) for c in range(GRID)}
                       - {o.cell for o in objects})
        edited[i] = replace(objects[i], cell=empty[int(rng.integers(len(empty)))])
    elif kind.startswith("swap_"):
        attribute = kind.removeprefix("swap_")
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)
                 if getattr(objects[a], attribute) != getattr(objects[b], attribute)]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        edited[a] = replace(objects[a], **{attribute: getattr(objects[b], attribute)})
        edited[b] = replace(objects[b], **{attribute: getattr(objects[a], attribute)})
    elif kind == "drop":
        if n < 2:
            return None
        edited = objects[:-1]  # the last in caption order: the others keep their word choices
    else:
        raise ValueError(f"unknown edit kind {kind!r}; one of {EDIT_KINDS}")
    return edited


def caption_pair(scene: Scene, kind: str, spec: WorldSpec,
                 rng: np.random.Generator) -> tuple[str, str] | None:
    """(true caption, edited caption) of `scene`, or None where the edit does not apply."""
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    edited = edit_objects(objects, kind, spec, rng)
    if edited is None:
        return None
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    choices = rng.integers(1 << 30, size=CHOICES)
    return template(ReplayRng(choices), objects), template(ReplayRng(choices), edited)


def write_compositionality(out: Path, scenes: list[Scene], image_paths: list[str],
                           spec: WorldSpec, seed: int) -> dict[str, int]:
    """Write OUT/compositionality/{kind}.json for each edit kind; returns items per kind."""
    directory = out / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for k, kind in enumerate(EDIT_KINDS):
        items = {}
        for index, (scene, path) in enumerate(zip(scenes, image_paths)):
            pair = caption_pair(scene, kind, spec, np.random.default_rng([seed, 7, k, index]))
            if pair is not None:
                items[str(len(items))] = {"filename": path, "caption": pair[0],
                                          "negative_caption": pair[1]}
        with open(directory / f"{kind}.json", "w") as f:
            json.dump(items, f, indent=0)
        counts[kind] = len(items)
    return counts


def write_lexicon(out: Path, spec: WorldSpec) -> Path:
    """The world's word classes as synonym groups (vlp.pipeline.data.negatives): colours,
    sizes, shapes, and the vertical and horizontal place words of the captions."""
    lexicon = {
        "colour": [list(COLOUR_WORDS.get(c, (c,))) for c in spec.colours],
        "size": [list(SIZE_WORDS[s]) for s in spec.sizes],
        "shape": [[s] for s in spec.shapes],
        "vertical": [["top", "upper"], ["bottom", "lower"]],
        "horizontal": [["left"], ["right"]],
    }
    path = out / LEXICON
    path.write_text(json.dumps(lexicon, indent=1))
    return path
