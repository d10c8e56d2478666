"""Edited captions as hard negatives (NegCLIP, ARO; SugarCrepe's replace and swap edits).

A lexicon names word classes, each a list of synonym groups:

    {"colour": [["red"], ["grey", "gray"], ...], "size": [["small", "little"], ["large", "big"]]}

An edit changes one thing in a caption: `replace` puts another group's word of the same class in
place of one word (an attribute or a place changed), `swap` exchanges two words of one class from
different groups (attributes bound to the wrong objects, the edit a bag of words cannot see).
The edited caption differs from the true one only there, so it is false of the image while
sharing every other word: a contrastive or matching loss can only tell the two apart by binding.
Words are matched case-insensitively as whole words; the rest of the caption is kept verbatim.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError

WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Lexicon:
    """word -> (class, group index), and per class its groups."""

    groups: dict[str, tuple[tuple[str, ...], ...]]

    def __post_init__(self):
        seen: dict[str, str] = {}
        for name, groups in self.groups.items():
            if len(groups) < 2 or not all(groups):
                raise UserError(f"lexicon class {name!r} needs at least 2 non-empty synonym "
                                f"groups, got {[list(g) for g in groups]}")
            for word in (w for group in groups for w in group):
                if not WORD.fullmatch(word) or word != word.lower():
                    raise UserError(f"lexicon word {word!r} ({name}) must be one lower-case word")
                if word in seen:
                    raise UserError(f"lexicon word {word!r} is in {seen[word]!r} and {name!r}")
                seen[word] = name

    @property
    def index(self) -> dict[str, tuple[str, int]]:
        return {word: (name, g) for name, groups in self.groups.items()
                for g, group in enumerate(groups) for word in group}


def load_lexicon(path: str | Path) -> Lexicon:
    """Read a lexicon JSON ({class: [[synonyms], ...]}); a malformed one is a UserError."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the hard-negative lexicon {path}: {exc}") from exc
    if not isinstance(raw, dict) or not all(
            isinstance(groups, list) and all(isinstance(g, list) for g in groups)
            for groups in raw.values()):
        raise UserError(f"{path}: a lexicon is a JSON object of word classes, each a list of "
                        'synonym lists, e.g. {"colour": [["red"], ["grey", "gray"]]}')
    return Lexicon({name: tuple(tuple(str(w) for w in g) for g in groups)
                    for name, groups in raw.items()})


class CaptionEditor:
    """Draws one edit of a caption: `edit(caption, rng)` -> edited caption, or None when the
    caption has no word of the lexicon to edit."""

    def __init__(self, lexicon: Lexicon, swap_share: float = 0.5,
                 class_weights: dict[str, float] | None = None):
        """`class_weights`: how much more likely an edit of a word of that class is (1 for a
        class not named), e.g. {"shape": 3} to train harder on what the model tells apart least."""
        self.lexicon, self.index = lexicon, lexicon.index
        self.swap_share = swap_share
        self.class_weights = dict(class_weights or {})
        unknown = sorted(set(self.class_weights) - set(lexicon.groups))
        if unknown:
            raise UserError(f"edit class weights name {unknown}, which the lexicon does not "
                            f"have; its classes: {sorted(lexicon.groups)}")

    def edit(self, caption: str, rng: random.Random) -> str | None:
        found = [(m, *self.index[m.group().lower()]) for m in WORD.finditer(caption)
                 if m.group().lower() in self.index]
        if not found:
            return None
        swaps = [(a, b) for i, a in enumerate(found) for b in found[i + 1:]
                 if a[1] == b[1] and a[2] != b[2]]
        if swaps and rng.random() < self.swap_share:
            (first, _, _), (second, _, _) = self._pick(swaps, [a[1] for a, _ in swaps], rng)
            return _substitute(caption, {first: second.group(), second: first.group()})
        match, name, group = self._pick(found, [f[1] for f in found], rng)
        others = [g for g in range(len(self.lexicon.groups[name])) if g != group]
        words = self.lexicon.groups[name][others[rng.randrange(len(others))]]
        return _substitute(caption, {match: words[rng.randrange(len(words))]})


    def _pick(self, candidates: list, classes: list[str], rng: random.Random):
        """One of `candidates` (each of the class in `classes`), drawn by class weight; uniform
        (one `randrange`) when the weights are equal."""
        weights = [self.class_weights.get(name, 1.0) for name in classes]
        if len(set(weights)) == 1:
            return candidates[rng.randrange(len(candidates))]
        return rng.choices(candidates, weights=weights)[0]


def _substitute(caption: str, replacements: dict[re.Match, str]) -> str:
    """The caption with each matched word replaced (spans do not overlap)."""
    out, end = [], 0
    for match in sorted(replacements, key=lambda m: m.start()):
        out += [caption[end:match.start()], replacements[match]]
        end = match.end()
    return "".join(out) + caption[end:]
