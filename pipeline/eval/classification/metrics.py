"""Classification metrics from class scores, with CLIP_benchmark's key names, and chance level.

    acc1, acc5              share of images whose true class is among the top 1 / top 5
    mean_per_class_recall   recall averaged over the classes that have test images
                            (sklearn's balanced_accuracy_score, as CLIP_benchmark computes it)

Ties count against the image (the true class ranks behind every class scoring at least as high),
as in retrieval: a collapsed model that scores every class the same gets 0, not 1/C. So do NaN
scores (a diverged linear probe must not look perfect).
acc5 is left out below 5 classes, where CLIP_benchmark reports NaN.
"""
from __future__ import annotations

import torch

TOP_K = 5


def true_class_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) rank (0 = first) of each image's true class among the classes: scores (N, C)."""
    true = scores.gather(1, labels[:, None])  # (N, 1)
    # classes not scoring below the true one, itself included; any comparison with NaN is False
    return (~(scores < true)).sum(dim=1) - 1


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (with at least 5 classes) and mean_per_class_recall of scores (N, C)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    ranks = true_class_ranks(scores.float(), labels)
    metrics = {"acc1": (ranks < 1).float().mean().item()}
    if scores.shape[1] >= TOP_K:
        metrics["acc5"] = (ranks < TOP_K).float().mean().item()
    metrics["mean_per_class_recall"] = mean_per_class_recall(ranks == 0, labels)
    return metrics


def mean_per_class_recall(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in `labels` of the share of their images that are correct."""
    present = labels.unique()
    hits = torch.zeros(int(labels.max()) + 1).index_add_(0, labels, correct.float())
    counts = torch.bincount(labels).float()
    return (hits[present] / counts[present]).mean().item()


def chance_metrics(num_classes: int) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of `num_classes` classes."""
    metrics = {"acc1": 1 / num_classes}
    if num_classes >= TOP_K:
        metrics["acc5"] = TOP_K / num_classes
    metrics["mean_per_class_recall"] = 1 / num_classes
    return metrics
