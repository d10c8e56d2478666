"""Fixed-budget fine-tuning shared by the evaluation jobs (VQA, captioning).

Every checkpoint gets the same budget, so the results compare: AdamW at a constant learning rate
for a fixed number of steps (or epochs), batches drawn from a fresh random permutation of the
training examples each epoch, seeded. Batches of (image, text) pairs are decoded by a thread pool.
Each step's count and loss go to the progress line on stderr (vlp.pipeline.progress).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.eval.encode import autocast, model_device
from vlp.pipeline.eval.images import ImageRef, load_decodable_images, load_images
from vlp.pipeline.progress import ProgressLine


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int | None = None  # fixed step budget; else `epochs` passes over the training set
    epochs: float = 1.0
    lr: float | None = None  # default 1e-3 for a task head alone, 1e-4 with the backbone
    batch_size: int = 32
    weight_decay: float = 0.01
    finetune_backbone: bool = False
    bf16: bool = False
    seed: int = 0

    def num_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(num_examples / self.batch_size)))

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.finetune_backbone else 1e-3


def finetune(model: torch.nn.Module, examples: list[int], cfg: FinetuneConfig,
             batch_loss: Callable[[list[int]], torch.Tensor | None],
             trainable: Callable[[str], bool], label: str) -> dict:
    """Train the parameters whose names `trainable` accepts on batches of `examples` (indices).

    `batch_loss(indices)` returns the loss of one batch, or None when none of its examples could
    be used (the step is then spent without an update). The model is left in eval mode. Returns
    the step count, learning rate, batch size, first and final loss (mean of the last tenth) and
    seconds. `label` names the progress line.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = model_device(model)
    num_steps, order, losses = cfg.num_steps(len(examples)), [], []
    start = time.perf_counter()
    model.train()
    try:
        with ProgressLine(label, num_steps, "step") as progress:
            for _ in range(num_steps):
                if len(order) < cfg.batch_size:  # next epoch: a fresh permutation
                    order += [examples[i]
                              for i in torch.randperm(len(examples), generator=generator)]
                batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
                with autocast(device, cfg.bf16):
                    loss = batch_loss(batch)
                if loss is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                progress.update(1, f"loss {losses[-1]:.4f}" if losses else "")
    finally:
        model.eval()
    tail = losses[-max(1, len(losses) // 10):] or [math.nan]
    return {
        "steps": num_steps,
        "lr": cfg.learning_rate(),
        "batch_size": cfg.batch_size,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 3),
    }


class ImageTextBatches:
    """(images, text ids, text mask, kept positions) for a batch of (image, text) pairs, on the
    model's device. With `skip_undecodable`, images that do not decode are left out of the batch
    (`kept` lists the positions used) and counted in `skipped`; otherwise they are an error."""

    def __init__(self, tokenizer, max_len: int, image_size: int, device: torch.device,
                 skip_undecodable: bool = False):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.image_size, self.device = image_size, device
        self.skip_undecodable, self.skipped = skip_undecodable, 0
        self.pool = ThreadPoolExecutor(max_workers=4)

    def __call__(self, images: list[ImageRef], texts: list[str]):
        if self.skip_undecodable:
            pixels, decoded = load_decodable_images(images, self.image_size, SkipCounter(),
                                                    self.pool)
            kept = decoded.nonzero().flatten().tolist()
            self.skipped += len(images) - len(kept)
            texts = [texts[i] for i in kept]
        else:
            pixels, kept = load_images(images, self.image_size, self.pool), list(range(len(images)))
        if not kept:
            return None, None, None, kept
        ids, mask = tokenize(self.tokenizer, texts, self.max_len)
        return pixels.to(self.device), ids.to(self.device), mask.to(self.device), kept

    def close(self) -> None:
        self.pool.shutdown()

    def __enter__(self) -> ImageTextBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
