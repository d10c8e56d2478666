"""Captioning with a checkpoint: the fixed-budget captioning fine-tune and batched decoding.

The fine-tune trains the whole model on the LM objective alone (next caption token from the
image and the caption before it, `vlp.models.model`), with the loop every evaluation fine-tune
shares (`vlp.pipeline.eval.finetune`). Images that do not decode are skipped and counted.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from vlp.models.decoding import DecodingConfig, generate
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.eval.encode import autocast, model_device
from vlp.pipeline.eval.finetune import FinetuneConfig, ImageTextBatches, finetune
from vlp.pipeline.eval.images import ImageRef, load_decodable_images
from vlp.pipeline.eval.karpathy import KarpathyImage
from vlp.pipeline.progress import ProgressLine


def finetune_captioning(model, tokenizer, pairs: list[tuple[ImageRef, str]],
                        cfg: FinetuneConfig) -> dict:
    """Train `model` (in place, every weight) on the captioning loss; returns training stats."""
    from vlp.models.model import LossWeights

    model.loss_weights = LossWeights(itc=0, itm=0, mlm=0, vqa=0, lm=1)

    def batch_loss(batch: list[int]) -> torch.Tensor | None:
        images, ids, mask, kept = batches([pairs[i][0] for i in batch],
                                          [pairs[i][1] for i in batch])
        return model(images, ids, mask)["loss"] if kept else None

    with ImageTextBatches(tokenizer, model.config.max_text_len, model.config.image_size,
                          model_device(model), skip_undecodable=True) as batches:
        stats = finetune(model, list(range(len(pairs))), cfg, batch_loss, lambda name: True,
                         "caption fine-tune")
    return {**stats, "train_pairs": len(pairs), "skipped_images": batches.skipped}


def image_batches(images: list[KarpathyImage], image_size: int, batch_size: int,
                  skipped: list[KarpathyImage], label: str
                  ) -> Iterator[tuple[list[KarpathyImage], torch.Tensor]]:
    """(images, uint8 pixels) batches of the images that decode; the others go to `skipped`.
    A batch counts as done in the progress line `label` once the caller asks for the next."""
    with (ThreadPoolExecutor(max_workers=4) as pool,
          ProgressLine(label, len(images), "image") as progress):
        for lo in range(0, len(images), batch_size):
            chunk = images[lo : lo + batch_size]
            pixels, decoded = load_decodable_images([image.image for image in chunk],
                                                    image_size, SkipCounter(), pool)
            skipped.extend(image for image, ok in zip(chunk, decoded.tolist()) if not ok)
            if decoded.any():
                yield [image for image, ok in zip(chunk, decoded.tolist()) if ok], pixels
            progress.update(len(chunk))


def special_ids(tokenizer) -> tuple[int, ...]:
    """Token ids a caption never contains: every special token but the end token ([SEP])."""
    return tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}))


@torch.inference_mode()
def caption_images(model, tokenizer, images: list[KarpathyImage], decoding: DecodingConfig,
                   batch_size: int = 64, bf16: bool = False
                   ) -> tuple[dict[int, str], list[KarpathyImage]]:
    """(image_id -> generated caption for the images that decode, the images that do not)."""
    device = model_device(model)
    captions, skipped = {}, []
    suppress = special_ids(tokenizer)
    for chunk, pixels in image_batches(images, model.config.image_size, batch_size, skipped,
                                       "caption decoding"):
        with autocast(device, bf16):
            tokens = generate(model, pixels.to(device), tokenizer.cls_token_id,
                              tokenizer.sep_token_id, decoding, suppress)
        for image, ids in zip(chunk, tokens):
            captions[image.image_id] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return captions, skipped
