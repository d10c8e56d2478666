"""Batched dual-encoder embeddings for retrieval, optionally bf16 and split across ranks.

If torch.distributed is initialised, rank r encodes the r-th contiguous slice of the items and the
slices are all-gathered, so every rank ends with the full (N, D) matrix in item order. Rank 0
shows the progress of its own slice on stderr (vlp.pipeline.progress).
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.distributed import fast_bf16
from vlp.pipeline.eval.images import ImageRef, load_decodable_images, load_images
from vlp.pipeline.progress import ProgressLine


def model_device(model) -> torch.device:
    """Where `model` computes: its parameters' device, or the `device` an encoder backend without
    parameters (vlp.models.onnx_encoders.OnnxEncoders) names."""
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return model.device


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when asked and bf16 is fast there (vlp.pipeline.distributed's
    fast_bf16), else a no-op context."""
    if not bf16 or not fast_bf16(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def distributed_map(
    num_items: int, batch_size: int, encode: Callable[[range], torch.Tensor],
    label: str = "encode", unit: str = "item",
) -> torch.Tensor:
    """Concatenate `encode(batch_indices)` over all items; each rank encodes its own slice,
    showing its progress as `label` counting `unit`s."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(num_items / world)
    lo, hi = min(num_items, rank * per_rank), min(num_items, (rank + 1) * per_rank)
    parts = []
    with ProgressLine(label, hi - lo, unit) as progress:
        for i in range(lo, hi, batch_size):
            batch = range(i, min(i + batch_size, hi))
            parts.append(encode(batch))
            progress.update(len(batch))
    local = torch.cat(parts) if parts else torch.empty(0)
    if world == 1:
        return local
    gathered: list[torch.Tensor | None] = [None] * world
    dist.all_gather_object(gathered, local.cpu())  # slices may differ in length (or be empty)
    return torch.cat([part for part in gathered if part.numel()])


@torch.inference_mode()
def encode_images(
    model, images: Sequence[ImageRef], image_size: int, batch_size: int = 64, bf16: bool = False,
    workers: int = 4, skipped: SkipCounter | None = None,
) -> torch.Tensor:
    """(N, D) float32 normalised image embeddings, in the order of `images`.

    An image that does not decode is a UserError naming it; with `skipped`, it is counted there
    instead and its row is NaN (the caller drops those rows).
    """
    device = model_device(model)
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def encode(batch: range) -> torch.Tensor:
            refs = [images[i] for i in batch]
            if skipped is None:
                pixels, decoded = load_images(refs, image_size, pool), None
            else:
                pixels, decoded = load_decodable_images(refs, image_size, skipped, pool)
            with autocast(device, bf16):
                emb = model.encode_image(pixels.to(device)).float().cpu()
            if decoded is None:
                return emb
            rows = torch.full((len(refs), emb.shape[1]), float("nan"))
            rows[decoded] = emb
            return rows

        return distributed_map(len(images), batch_size, encode, "encode images", "image")


@torch.inference_mode()
def encode_texts(
    model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 256, bf16: bool = False
) -> torch.Tensor:
    """(N, D) float32 normalised text embeddings, in the order of `texts`."""
    device = model_device(model)

    def encode(batch: range) -> torch.Tensor:
        ids, mask = tokenize(tokenizer, [texts[i] for i in batch], max_len)
        with autocast(device, bf16):
            return model.encode_text(ids.to(device), mask.to(device)).float().cpu()

    return distributed_map(len(texts), batch_size, encode, "encode texts", "text")
