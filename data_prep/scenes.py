"""Scenes of the synthetic world: what is in a picture (sampling) and how it looks (rendering).

A scene is 1..max_objects objects, each a (shape, colour, size, cell) with every object in its own
cell of a 3x3 grid, so objects never overlap and every spatial word in a caption is exact. The
background (a dark low-contrast gradient with light noise) and small jitters of position, size and
colour are drawn at render time: they vary the pixels without being part of the scene's identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GRID = 3
# Object colours, bright enough to stand out on the dark backgrounds below.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 50),
    "green": (50, 185, 70),
    "blue": (45, 105, 235),
    "purple": (165, 70, 215),
    "grey": (150, 150, 150),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
# Half-extent of an object as a fraction of the cell side. With the jitter below an object stays
# inside its cell: 0.38 * 1.08 + 0.08 < 0.5.
SIZE_RADIUS = {"small": 0.22, "large": 0.38}
POSITION_JITTER = 0.08
SIZE_JITTER = 0.08
COLOUR_JITTER = 12


@dataclass(frozen=True)
class WorldSpec:
    """The attribute lists and scene statistics; `generate_world` records them in world.json."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = SIZES
    # Probability of a scene having 1, 2, ... objects (at most GRID * GRID).
    object_count_weights: tuple[float, ...] = (0.2, 0.4, 0.4)
    questions_per_image: int = 4

    def __post_init__(self):
        for name, allowed, chosen in (
            ("shapes", SHAPES, self.shapes),
            ("colours", COLOURS, self.colours),
            ("sizes", SIZES, self.sizes),
        ):
            unknown = set(chosen) - set(allowed)
            if unknown or len(chosen) < 2:
                raise ValueError(f"{name} must be >= 2 of {sorted(allowed)}, got {list(chosen)}")
        if not 1 <= len(self.object_count_weights) <= GRID * GRID:
            raise ValueError(f"object_count_weights needs 1..{GRID * GRID} entries")

    @property
    def max_objects(self) -> int:
        return len(self.object_count_weights)


@dataclass(frozen=True, order=True)
class Obj:
    """One object; `cell` is (row, column) on the grid, (0, 0) = top left."""

    cell: tuple[int, int]
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """Objects sorted by cell, so equal scenes compare (and hash) equal."""

    objects: tuple[Obj, ...]

    @classmethod
    def of(cls, objects) -> "Scene":
        return cls(tuple(sorted(objects)))


def sample_scene(rng: np.random.Generator, spec: WorldSpec) -> Scene:
    """Draw the number of objects, distinct cells and independent attributes."""
    weights = np.asarray(spec.object_count_weights, dtype=float)
    count = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    return Scene.of(
        Obj(
            cell=divmod(int(cell), GRID),
            shape=str(rng.choice(spec.shapes)),
            colour=str(rng.choice(spec.colours)),
            size=str(rng.choice(spec.sizes)),
        )
        for cell in cells
    )


def sample_scenes(
    rng: np.random.Generator, spec: WorldSpec, n: int, forbidden: set[Scene], unique: bool
) -> list[Scene]:
    """Draw `n` scenes none of which is in `forbidden`; with `unique`, no two equal either."""
    scenes: list[Scene] = []
    seen = set(forbidden)
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(
                f"cannot draw {n} scenes disjoint from {len(forbidden)} held-out ones: the "
                "attribute lists are too small for these counts; add shapes/colours or use more "
                "objects per scene"
            )
        scene = sample_scene(rng, spec)
        if scene in seen:
            continue
        scenes.append(scene)
        if unique:
            seen.add(scene)
    return scenes


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark, slightly tinted linear gradient with light noise: (size, size, 3) uint8."""
    base = rng.uniform(20, 70, size=3)
    delta = rng.uniform(-20, 20, size=3)
    ramp = np.linspace(-0.5, 0.5, size)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    image = base + ramp[..., None] * delta
    image = image + rng.normal(0, 3, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.9 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        t = 0.35 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"no drawing for shape {shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """Render `scene` at `size` x `size` pixels."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for obj in scene.objects:
        row, col = obj.cell
        cx = (col + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
        r = SIZE_RADIUS[obj.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * cell
        rgb = np.asarray(COLOURS[obj.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        _draw(draw, obj.shape, cx, cy, r, tuple(int(v) for v in np.clip(rgb, 0, 255)))
    return image

