"""Captioning baselines, computed by the evaluation job beside the model's captions:

- most_frequent: the training caption given most often (first in file order among ties), for
  every image: what a model that ignores the image scores.
- retrieval: each test image gets the training caption closest to it under the checkpoint's ITC
  embeddings (its dual encoder, as retrieval uses it): what a model that can only retrieve, not
  compose, scores. On the synthetic world test scenes are new combinations, so a retrieved
  caption is always wrong somewhere.
"""
from __future__ import annotations

from collections import Counter

import torch

from vlp.pipeline.eval.caption.captioner import image_batches
from vlp.pipeline.eval.encode import autocast, encode_texts, model_device
from vlp.pipeline.eval.karpathy import KarpathyImage


def most_frequent_caption(train_captions: list[str]) -> str:
    return Counter(train_captions).most_common(1)[0][0]


@torch.inference_mode()
def retrieved_captions(model, tokenizer, images: list[KarpathyImage], train_captions: list[str],
                       batch_size: int = 64, bf16: bool = False) -> dict[int, str]:
    """image_id -> the nearest training caption under ITC, for the images that decode."""
    device = model_device(model)
    texts = sorted(set(train_captions))
    text_emb = encode_texts(model, tokenizer, texts, model.config.max_text_len,
                            batch_size * 4, bf16).to(device)  # (N_text, D)
    nearest = {}
    for chunk, pixels in image_batches(images, model.config.image_size, batch_size, [],
                                       "caption retrieval baseline"):
        with autocast(device, bf16):
            image_emb = model.encode_image(pixels.to(device)).float()  # (B, D)
        best = (image_emb @ text_emb.T).argmax(dim=1).tolist()
        nearest.update((image.image_id, texts[i]) for image, i in zip(chunk, best))
    return nearest
