"""Linear probe: logistic regression on frozen image features, as CLIP_benchmark runs it.

CLIP_benchmark's procedure (clip_benchmark/metrics/linear_probe.py, fewshot_k=-1), matched here:
- features are the normalised image embeddings;
- the classifier is one linear layer trained with cross-entropy, AdamW and a cosine learning-rate
  schedule without warmup, over shuffled mini-batches (lr 0.1, 10 epochs, batch 64, seed 0);
- its L2 strength (AdamW's weight decay) is searched on a validation split over
  logspace(-6, 2, 97): the 7 decades first, then around the best at spans 8, 4, 2, 1, keeping the
  first best validation acc1 in the order tried;
- the final classifier is trained on train + validation and scored on the test split.
Differences: it runs on any device (CLIP_benchmark's asserts CUDA), features stay in memory (no
feature cache files), each (weight decay, data) fit runs once and its score is reused, and when no
validation split exists `val_proportion` of the training images is held out (CLIP_benchmark's
--val_proportion).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel, load_model
from vlp.pipeline.eval.classification.data import load_classification
from vlp.pipeline.eval.classification.features import Features, encode_set, result_header
from vlp.pipeline.eval.classification.metrics import chance_metrics, classification_metrics
from vlp.pipeline.eval.configs import LinearProbeConfig
from vlp.pipeline.eval.encode import model_device
from vlp.pipeline.eval.results import write_result
from vlp.pipeline.progress import ProgressLine

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
COARSE = list(range(0, len(WEIGHT_DECAYS), 16))  # the 7 decades 1e-6 ... 1e2
SPANS = (8, 4, 2, 1)  # the refinements around the best so far
# Each refinement fits the best's two neighbours, new indices (odd multiples of the span) unless
# the best is at an end of the range: at most 7 + 2 * 4 = 15 fits.
SEARCH_FITS = len(COARSE) + 2 * len(SPANS)


@dataclass(frozen=True)
class ProbeSettings:
    """CLIP_benchmark's defaults (--fewshot_lr, --fewshot_epochs, --batch_size, --seed)."""

    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if not (self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1):
            raise UserError(f"linear probe needs lr > 0, epochs >= 1 and batch_size >= 1, got "
                            f"{asdict(self)}")


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                settings: ProbeSettings) -> torch.nn.Linear:
    """A linear classifier (D -> num_classes) fitted to features x (N, D), labels y (N,), on
    their device."""
    generator = torch.Generator().manual_seed(settings.seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    bound = 1 / math.sqrt(x.shape[1])  # nn.Linear's default initialisation, seeded
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    layer.to(x.device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=settings.lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    total, step = settings.epochs * steps_per_epoch, 0
    with torch.enable_grad():
        for _ in range(settings.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                cosine = 0.5 * (1 + math.cos(math.pi * step / total))
                optimizer.param_groups[0]["lr"] = cosine * settings.lr
                loss = F.cross_entropy(layer(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
    return layer.eval()


def search_weight_decay(val_acc1: Callable[[float], float]) -> int:
    """Index into WEIGHT_DECAYS of the best validation acc1 (CLIP_benchmark's search)."""
    scores: dict[int, float] = {}

    def best(indices: list[int]) -> int:
        best_index, best_acc = indices[0], float("-inf")
        for index in indices:
            if index not in scores:
                scores[index] = val_acc1(WEIGHT_DECAYS[index])
            if scores[index] > best_acc:
                best_index, best_acc = index, scores[index]
        return best_index

    peak = best(COARSE)
    for span in SPANS:
        peak = best([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
    return peak


def probe_metrics(train: Features, val: Features, test: Features, num_classes: int,
                  settings: ProbeSettings) -> tuple[dict[str, float], float]:
    """Test metrics of the probe whose weight decay is best on `val`, trained on train + val;
    and that weight decay."""

    def val_acc1(weight_decay: float) -> float:
        probe = train_probe(train.x, train.y, num_classes, weight_decay, settings)
        progress.update()
        with torch.no_grad():
            return classification_metrics(probe(val.x).cpu(), val.y.cpu())["acc1"]

    with (_one_cpu_thread(train.x.device),
          ProgressLine("linear probe fits", SEARCH_FITS + 1, "fit") as progress):
        weight_decay = WEIGHT_DECAYS[search_weight_decay(val_acc1)]
        progress.update(SEARCH_FITS - progress.done)  # a best at an end of the range needs fewer
        probe = train_probe(torch.cat([train.x, val.x]), torch.cat([train.y, val.y]),
                            num_classes, weight_decay, settings)
        progress.update()
        with torch.no_grad():
            return classification_metrics(probe(test.x).cpu(), test.y.cpu()), weight_decay


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """A probe step multiplies a (64, D) batch by (D, C) weights: on a CPU, starting and
    synchronising threads costs more than that (about 5x on 2 busy cores), so use one."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hold_out(features: Features, proportion: float, seed: int) -> tuple[Features, Features]:
    """Split `proportion` of the images off as a validation set (seeded)."""
    if not 0 < proportion < 1:
        raise UserError(f"val_proportion must be in (0, 1), got {proportion}")
    order = torch.randperm(len(features.y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(proportion * len(order)))
    if n_val >= len(order):
        raise UserError(f"{len(order)} training image(s) cannot spare a validation split")
    val, train = order[:n_val], order[n_val:]
    return (Features(features.x[train], features.y[train], features.skipped),
            Features(features.x[val], features.y[val], {}))


def _settings(config: LinearProbeConfig) -> ProbeSettings:
    return ProbeSettings(config.lr, config.epochs, config.probe_batch_size, config.seed)


def evaluate_linear_probe(checkpoint: str | Path | LoadedModel, config: LinearProbeConfig, *,
                          out: str | Path | None = None, device: str = "cpu") -> dict:
    """Linear-probe acc1/acc5/mean_per_class_recall on DATASET/TEST_SPLIT, with chance.

    Validation is DATASET/VAL_SPLIT when it exists, else `val_proportion` of the training split.
    `batch_size` is for encoding images, `probe_batch_size` for fitting. The data is read and
    checked before a checkpoint path is loaded (onto `device`). Writes `out` if given.
    """
    dataset, classnames = config.dataset, config.classnames
    splits = {"train": load_classification(dataset, config.train_split, classnames),
              "test": load_classification(dataset, config.test_split, classnames)}
    if (dataset / config.val_split).is_dir():
        splits["val"] = load_classification(dataset, config.val_split, classnames)
    for split in splits.values():
        if split.classnames != splits["test"].classnames:
            raise UserError(f"{split.source} and {splits['test'].source} have different classes; "
                            "every split must have the same class list")
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    start = time.perf_counter()
    features = {name: encode_set(loaded, split, config.batch_size, config.bf16)
                for name, split in splits.items()}
    fit_device = model_device(loaded.model)  # fit where the model runs, as CLIP_benchmark does
    features = {name: Features(f.x.to(fit_device), f.y.to(fit_device), f.skipped)
                for name, f in features.items()}
    if "val" not in features:
        features["train"], features["val"] = hold_out(features["train"], config.val_proportion,
                                                      config.seed)
    num_classes = len(splits["test"].classnames)
    metrics, weight_decay = probe_metrics(features["train"], features["val"], features["test"],
                                          num_classes, _settings(config))
    result = {
        **result_header("linear_probe", loaded, splits["test"]),
        **{f"num_{name}": len(f.y) for name, f in features.items()},
        "validation": splits["val"].source if "val" in splits else
        f"{config.val_proportion:g} of {splits['train'].source}",
        "weight_decay": weight_decay,
        "settings": asdict(_settings(config)),
        "metrics": metrics,
        "baselines": {"chance": chance_metrics(num_classes)},
        "skipped": {name: f.skipped for name, f in features.items() if f.skipped},
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_result(result, out)
    return result
