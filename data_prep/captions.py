"""Natural-language descriptions of scenes: every caption names every object's size, colour, shape
and position, with the wording, object order and synonyms (big/large, middle/centre, grey/gray)
drawn at random so that no fixed word order carries the meaning.

Phrases are kept short so that a three-object caption is at most MAX_CAPTION_TOKENS words and
punctuation marks: with [CLS] and [SEP] it fits a 32-token text encoder without truncation.
"""
from __future__ import annotations

import numpy as np

from vlp.data_prep.scenes import Obj, Scene

POSITION_PHRASES = {
    (0, 0): ("in the top left", "at the upper left", "at the top left"),
    (0, 1): ("at the top", "at the top centre", "in the top middle"),
    (0, 2): ("in the top right", "at the upper right", "at the top right"),
    (1, 0): ("on the left", "on the left side", "at the left"),
    (1, 1): ("in the centre", "in the middle", "in the center"),
    (1, 2): ("on the right", "on the right side", "at the right"),
    (2, 0): ("in the bottom left", "at the lower left", "at the bottom left"),
    (2, 1): ("at the bottom", "at the bottom centre", "in the bottom middle"),
    (2, 2): ("in the bottom right", "at the lower right", "at the bottom right"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COLOUR_WORDS = {"grey": ("grey", "gray")}
MAX_CAPTION_TOKENS = 30
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def colour_word(rng: np.random.Generator, colour: str) -> str:
    return pick(rng, COLOUR_WORDS.get(colour, (colour,)))


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(rng: np.random.Generator, obj: Obj) -> str:
    """'a big red circle'."""
    size = pick(rng, SIZE_WORDS[obj.size])
    return with_article(f"{size} {colour_word(rng, obj.colour)} {obj.shape}")


def join(parts: list[str], last: str = " and ") -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + last + parts[-1]


def _described(rng, objects):
    return join([f"{object_phrase(rng, o)} {pick(rng, POSITION_PHRASES[o.cell])}" for o in objects])


# Each template maps (rng, objects in a random order) to a caption.
TEMPLATES = (
    _described,
    lambda rng, objects: "there is " + _described(rng, objects),
    lambda rng, objects: "a picture of " + _described(rng, objects),
    lambda rng, objects: _described(rng, objects) + " on a dark background",
    lambda rng, objects: (
        f"{NUMBER_WORDS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: "
        + _described(rng, objects)
    ),
    lambda rng, objects: join(
        [f"{pick(rng, POSITION_PHRASES[o.cell])} {object_phrase(rng, o)}" for o in objects]
    ),
)


def captions(scene: Scene, rng: np.random.Generator, k: int) -> list[str]:
    """`k` captions of `scene`, each from a different template."""
    if not 1 <= k <= len(TEMPLATES):
        raise ValueError(f"k must be 1..{len(TEMPLATES)}, got {k}")
    chosen = rng.choice(len(TEMPLATES), size=k, replace=False)
    return [
        TEMPLATES[int(t)](rng, [scene.objects[i] for i in rng.permutation(len(scene.objects))])
        for t in chosen
    ]
