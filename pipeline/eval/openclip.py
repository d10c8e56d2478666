"""An OpenCLIP-compatible view of a vlp checkpoint, so that CLIP_benchmark's evaluation functions
(and other code written for OpenCLIP models) run on it unchanged.

    model, transform, tokenizer = load_openclip("runs/tiny/checkpoints", device="cpu")
    model.encode_image(images)                   # (B, D), unit length
    model.encode_text(tokenizer(["a red circle"]))
    transform(pil_image)                         # uint8 (3, S, S), the training preprocessing

CLIP_benchmark's metric functions take a DataLoader; `classification_loader` and
`retrieval_loader` build one from vlp's own dataset readers and decode images exactly as the
`vlp eval` jobs do, so both give the same numbers on the same data.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.data.transforms import image_to_tensor
from vlp.pipeline.eval.classification.data import ClassificationSet
from vlp.pipeline.eval.images import ImageRef, load_decodable_images
from vlp.pipeline.eval.retrieval.data import RetrievalSet


class OpenClipModel(torch.nn.Module):
    """OpenCLIP's model interface over a vlp UnifiedModel: `encode_image(images)`,
    `encode_text(token_ids)` (padding found from the pad id) and `forward(image, text)`.
    Embeddings are always unit length, so `normalize` changes nothing."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.model.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(image)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(text, text != self.pad_token_id)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()


class OpenClipTokenizer:
    """OpenCLIP's tokenizer call: text(s) -> (B, context_length) ids, [CLS] first, padded."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return tokenize(self.tokenizer, texts, context_length or self.context_length)[0]


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> uint8 (3, S, S): resize the shorter side, centre crop (the model normalises)."""
    return lambda image: image_to_tensor(image.convert("RGB"), image_size)


def load_openclip(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model, transform, tokenizer) for any checkpoint `load_model` accepts, the triple
    CLIP_benchmark's model loaders return."""
    loaded = load_model(checkpoint, device=device)
    config = loaded.info.config
    model = OpenClipModel(loaded.model, loaded.tokenizer.pad_token_id).eval()
    tokenizer = OpenClipTokenizer(loaded.tokenizer, config["max_text_len"])
    return model, image_transform(config["image_size"]), tokenizer


def clip_benchmark_loader(model_name: str = "", pretrained: str = "", cache_dir=None,
                          device: str | torch.device = "cpu"):
    """`load_openclip` with the signature of CLIP_benchmark's model loaders (its
    clip_benchmark.models.TYPE2FUNC); `pretrained` is the checkpoint path."""
    return load_openclip(pretrained, device)


class DecodedBatches(torch.utils.data.IterableDataset):
    """(uint8 images (B, 3, S, S), collated targets) batches, decoded as the vlp jobs decode;
    an image that does not decode is left out with its target and counted in `skipped`."""

    def __init__(self, images: list[ImageRef], targets: list, image_size: int, batch_size: int,
                 collate: Callable[[list], Any]):
        self.images, self.targets, self.image_size = images, targets, image_size
        self.batch_size, self.collate = batch_size, collate
        self.skipped = SkipCounter()

    def __iter__(self):
        with ThreadPoolExecutor(max_workers=4) as pool:
            for lo in range(0, len(self.images), self.batch_size):
                hi = lo + self.batch_size
                pixels, decoded = load_decodable_images(self.images[lo:hi], self.image_size,
                                                        self.skipped, pool)
                if decoded.any():
                    kept = [t for t, ok in zip(self.targets[lo:hi], decoded.tolist()) if ok]
                    yield pixels, self.collate(kept)


def classification_loader(dataset: ClassificationSet, image_size: int, batch_size: int = 64,
                          templates: list[str] | None = None) -> torch.utils.data.DataLoader:
    """Batches of (images, labels); `.dataset.classes` and `.dataset.templates` as
    CLIP_benchmark's datasets carry them."""
    batches = DecodedBatches(dataset.images, dataset.labels, image_size, batch_size,
                             lambda labels: torch.tensor(labels))
    batches.classes = dataset.classnames
    batches.templates = templates or dataset.templates
    return torch.utils.data.DataLoader(batches, batch_size=None)


def retrieval_loader(dataset: RetrievalSet, image_size: int,
                     batch_size: int = 64) -> torch.utils.data.DataLoader:
    """Batches of (images, [captions of each image]), CLIP_benchmark's retrieval batches."""
    captions: list[list[str]] = [[] for _ in dataset.images]
    for caption, image in zip(dataset.captions, dataset.text_to_image):
        captions[image].append(caption)
    batches = DecodedBatches(dataset.images, captions, image_size, batch_size, list)
    return torch.utils.data.DataLoader(batches, batch_size=None)
