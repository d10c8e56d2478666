"""Per-sample preprocessing shared by training, evaluation and benchmarks.

Images: decode (JPEG draft mode: the decoder downsamples by 1/2, 1/4 or 1/8 for free), resize the
shorter side to `image_size`, centre crop, scale to [0, 1] and normalise. No horizontal flip: the
synthetic captions (and many real ones) say "left" and "right".
Text: HF tokenizer to fixed-length ids with [CLS] first and a boolean mask (True = real token).
"""
from __future__ import annotations

import io
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

# CLIP's statistics; any fixed choice works as long as train and eval agree.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# Refuse images whose header claims more pixels than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
# The only formats PIL may try: without a list it probes every plugin it has (EPS runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_MEAN = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD).view(3, 1, 1)


class BadSample(ValueError):
    """A sample that cannot be used; `kind` names the counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, image_size: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image, using JPEG draft mode to decode small."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample("decompression_bomb", f"image claims {width}x{height} pixels")
        image.draft("RGB", (image_size, image_size))
        if image.mode == "RGB":
            image.load()  # convert() would decode and then copy
            return image
        return image.convert("RGB")
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, checked inside open()
        raise BadSample("decompression_bomb", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadSample("bad_image", f"undecodable image: {exc}") from exc


def image_to_array(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and centre crop: uint8 (S, S, 3), read-only."""
    width, height = image.size
    scale = image_size / min(width, height)
    if scale != 1.0:
        new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    if (image.width, image.height) != (image_size, image_size):
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image)


def normalize_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> normalised float (..., 3, S, S); one pass for a whole batch."""
    tensor = pixels.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    return tensor.div_(255.0).sub_(_MEAN).div_(_STD)


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size`, centre crop, normalise: float (3, S, S)."""
    return normalize_images(torch.tensor(image_to_array(image, image_size)))


def preprocess_image(data: bytes, image_size: int) -> torch.Tensor:
    """Image bytes -> normalised float tensor (3, S, S); raises BadSample."""
    return image_to_tensor(decode_image(data, image_size), image_size)


def decode_caption(data: bytes | None) -> str:
    """Caption bytes -> stripped text; raises BadSample for missing, non-UTF-8 or empty text."""
    if data is None:
        raise BadSample("missing_caption", "sample has no caption")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample("non_utf8_caption", f"caption is not UTF-8: {exc}") from exc
    if not text:
        raise BadSample("empty_caption", "caption is empty")
    return text


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids long (B, L), mask bool (B, L)); [CLS] first, padded/truncated to `max_len`."""
    backend = _fixed_length_backend(tokenizer, max_len)
    if backend is None:
        encoded = tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].bool()
    encodings = backend.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), max_len)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
    return ids, mask.view(len(texts), max_len)


# Fast tokenizer -> {max_len: Rust tokenizer that truncates and pads to max_len}.
_FIXED_LENGTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fixed_length_backend(tokenizer, max_len: int):
    """A private copy of a fast tokenizer's Rust backend, set up as `tokenizer(texts,
    padding="max_length", truncation=True, max_length=max_len)` sets it up, minus transformers'
    per-call Python overhead (most of the cost for short captions). None for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    try:
        cache = _FIXED_LENGTH.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build each time
        cache = {}
    if max_len not in cache:
        fixed = Tokenizer.from_str(backend.to_str())
        fixed.enable_truncation(max_length=max_len, stride=0, strategy="longest_first",
                                direction=tokenizer.truncation_side)
        fixed.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id,
                             pad_type_id=tokenizer.pad_token_type_id,
                             pad_token=tokenizer.pad_token, direction=tokenizer.padding_side)
        cache[max_len] = fixed
    return cache[max_len]


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
