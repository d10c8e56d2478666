"""Per-sample preprocessing shared by training, evaluation and benchmarks.

Images: decode (JPEG draft mode: the decoder downsamples by 1/2, 1/4 or 1/8 for free), take the
centre square and resize it to `image_size` (the shorter side resized, then a centre crop, without
ever resizing the rest), and hand over uint8 pixels (3, S, S): a quarter of the bytes of fp32 on
the way to the GPU. Images that claim too many pixels or an extreme aspect ratio are skipped
before decoding. The model normalises them on its own device
(`vlp.models.model.ImageEmbedding`). No horizontal flip: the synthetic captions (and many real
ones) say "left" and "right".
Captions: UTF-8 text, stripped; MLM masking of token ids (BERT's 80/10/10).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlp.pipeline.data.errors import BadData

# Refuse images whose header claims more pixels than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
# ... or a longer side more than this many times the shorter (a 2000x1 strip): a centre crop of it
# is a sliver of the picture.
MAX_ASPECT_RATIO = 20
# Member extensions the loaders decode; nothing else is ever decoded (no pickles).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "text", "caption")
# The only formats PIL may try: without a list it probes every plugin it has (EPS runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


def decode_image(data: bytes, image_size: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image, using JPEG draft mode to decode small."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadData("decompression_bomb", f"image claims {width}x{height} pixels")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise BadData("extreme_aspect_ratio", f"image is {width}x{height}: an aspect ratio "
                                                  f"beyond {MAX_ASPECT_RATIO}:1")
        image.draft("RGB", (image_size, image_size))
        if image.mode == "RGB":
            image.load()  # convert() would decode and then copy
            return image
        return image.convert("RGB")
    except BadData:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, checked inside open()
        raise BadData("decompression_bomb", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadData("bad_image", f"undecodable image: {exc}") from exc


def image_to_array(image: Image.Image, image_size: int) -> np.ndarray:
    """The centre square resized to `image_size`: uint8 (S, S, 3), read-only. Only the square is
    resampled (PIL's `box`), so the cost is S x S pixels whatever the aspect ratio."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side != image_size:
        image = image.resize((image_size, image_size), Image.BICUBIC, box=box)
    elif (width, height) != (side, side):
        image = image.crop(box)
    return np.asarray(image)


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """The centre square resized to `image_size`: uint8 (3, S, S)."""
    return torch.from_numpy(image_to_array(image, image_size).copy()).permute(2, 0, 1)


def preprocess_image(data: bytes, image_size: int) -> torch.Tensor:
    """Image bytes -> uint8 tensor (3, S, S); raises BadData."""
    return image_to_tensor(decode_image(data, image_size), image_size)


def decode_caption(data: bytes | None) -> str:
    """Caption bytes -> stripped text; raises BadData for missing, non-UTF-8 or empty text."""
    if data is None:
        raise BadData("missing_caption", "sample has no caption")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadData("non_utf8_caption", f"caption is not UTF-8: {exc}") from exc
    if not text:
        raise BadData("empty_caption", "caption is empty")
    return text


@dataclass(frozen=True)
class MaskingSpec:
    """BERT masking: of the `probability` chosen tokens, 80% -> [MASK], 10% random, 10% kept."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float = 0.15


def mask_tokens(
    ids: torch.Tensor, mask: torch.Tensor, spec: MaskingSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked ids, labels) with labels -100 where no prediction is asked.

    At least one real token per row is chosen, so every row contributes to the MLM loss.
    """
    candidates = mask.clone()
    for special in spec.special_ids:
        candidates &= ids != special
    scores = torch.rand(ids.shape, generator=generator)
    chosen = (scores < spec.probability) & candidates
    # Rows with no chosen token: pick their highest-scoring candidate.
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    if empty.any():
        best = torch.where(candidates, scores, torch.full_like(scores, -1.0)).argmax(dim=1)
        chosen[empty, best[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = spec.mask_token_id
    randomise = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(spec.vocab_size, ids.shape, generator=generator)
    masked[randomise] = random_ids[randomise]
    return masked, labels
