"""Frozen image features of a classification set, and the header every classification result
shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.eval.classification.data import ClassificationSet
from vlp.pipeline.eval.encode import encode_images


@dataclass
class Features:
    x: torch.Tensor  # (N, D) normalised image embeddings of the images that decoded
    y: torch.Tensor  # (N,) their labels
    skipped: dict[str, int]  # images that did not decode, by kind


def encode_set(loaded: LoadedModel, dataset: ClassificationSet, batch_size: int,
               bf16: bool) -> Features:
    """Image embeddings of `dataset`; undecodable images are skipped and counted."""
    skipped = SkipCounter()
    emb = encode_images(loaded.model, dataset.images, loaded.info.config["image_size"],
                        batch_size, bf16, skipped=skipped)
    kept = ~emb.isnan().any(dim=1)
    if not kept.any():
        raise UserError(f"{dataset.source}: none of its {len(dataset.images)} images decodes")
    return Features(emb[kept], torch.tensor(dataset.labels)[kept], skipped.counts)


def result_header(task: str, loaded: LoadedModel, dataset: ClassificationSet) -> dict:
    return {"task": task, "dataset": dataset.source, "model": loaded.info.path,
            "step": loaded.info.step, "num_classes": len(dataset.classnames)}
