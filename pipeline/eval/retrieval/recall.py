"""Retrieval recall@k from embeddings, in bounded memory, plus the chance-level baseline.

Scores are computed one block of queries at a time (`chunk` x #candidates), so 5k images x 25k
captions never materialise the full 5k x 25k matrix (nor its argsort). For every query we only
need the rank of its best positive: the number of negatives scoring at least as high. Ties count
against the query, so a collapsed model (all embeddings equal) scores 0, not 1.

Key names follow CLIP_benchmark: `image_retrieval_recall@k` is text->image (a caption retrieves
its image), `text_retrieval_recall@k` is image->text (an image retrieves any of its captions).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# (query_indices (Q,), candidate_indices (Q, K)) -> score bonus (Q, K) for those pairs.
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def best_positive_ranks(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    positives: torch.Tensor,
    chunk: int = 1024,
    rerank_k: int = 0,
    rerank: PairScorer | None = None,
) -> torch.Tensor:
    """Rank (0 = first) of each query's best-scoring positive among its candidates.

    positives (N_query, P): candidate indices of each query's positives, padded with -1. With
    `rerank`, each query's top `rerank_k` candidates get `rerank(query_idx, cand_idx)` added to
    their score; a non-negative bonus reorders only the top-k. Queries without a positive get -1.
    """
    query_emb, cand_emb = query_emb.float(), cand_emb.float()
    ranks = torch.empty(len(query_emb), dtype=torch.long)
    for start in range(0, len(query_emb), chunk):
        idx = torch.arange(start, min(start + chunk, len(query_emb)))
        scores = query_emb[idx] @ cand_emb.T  # (Q, N)
        if rerank is not None and rerank_k > 0:
            top = scores.topk(min(rerank_k, scores.shape[1]), dim=1).indices  # (Q, K)
            scores.scatter_add_(1, top, rerank(idx, top).to(scores.dtype))
        pos = positives[idx]  # (Q, P)
        pos_scores = scores.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, float("-inf"))
        best = pos_scores.amax(dim=1, keepdim=True)  # (Q, 1)
        # candidates at least as good as the best positive, minus the positives among them
        rank = (scores >= best).sum(dim=1) - (pos_scores >= best).sum(dim=1)
        ranks[idx] = torch.where(pos.ge(0).any(dim=1), rank, torch.full_like(rank, -1))
    return ranks


def retrieval_recalls(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    rerank_k: int = 0,
    rerank_t2i: PairScorer | None = None,
    rerank_i2t: PairScorer | None = None,
) -> dict[str, float]:
    """Text->image and image->text recall@k and their mean, CLIP_benchmark key names.

    image_emb (N_img, D) and text_emb (N_txt, D) are L2-normalised; text_to_image[t] is the image
    of caption t. Images without captions stay in the text->image gallery and are left out of the
    image->text average. Optional ITM re-rankers score (text, image) pairs for the top `rerank_k`.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(t2i) != len(text_emb):
        raise ValueError(f"text_to_image has {len(t2i)} entries for {len(text_emb)} captions")
    t2i_ranks = best_positive_ranks(text_emb, image_emb, t2i[:, None], chunk, rerank_k, rerank_t2i)
    i2t_ranks = best_positive_ranks(image_emb, text_emb, captions_per_image(t2i, len(image_emb)),
                                    chunk, rerank_k, rerank_i2t)
    i2t_ranks = i2t_ranks[i2t_ranks >= 0]
    return recalls_from_ranks(t2i_ranks, i2t_ranks, ks)


def recalls_from_ranks(t2i_ranks: torch.Tensor, i2t_ranks: torch.Tensor, ks) -> dict[str, float]:
    """CLIP_benchmark keys from 0-based ranks of the best positive (text->image, image->text)."""
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (t2i_ranks < k).float().mean().item()
    for k in ks:
        metrics[f"text_retrieval_recall@{k}"] = (i2t_ranks < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def captions_per_image(text_to_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """(N_img, max captions per image) caption indices of each image, padded with -1."""
    counts = torch.bincount(text_to_image, minlength=num_images)
    order = torch.argsort(text_to_image, stable=True)  # captions grouped by image
    slot = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[text_to_image[order]]
    table = torch.full((num_images, max(int(counts.max()), 1)), -1, dtype=torch.long)
    table[text_to_image[order], slot] = order
    return table


def chance_recalls(
    num_images: int, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Expected recall@k of a random ranking, same keys as `retrieval_recalls`.

    Text->image: k / N_img. Image->text for an image with m of the N captions: the chance that a
    random k-subset of captions contains one of them, 1 - C(N-m, k) / C(N, k).
    """
    num_texts = len(text_to_image)
    counts = torch.bincount(torch.as_tensor(text_to_image, dtype=torch.long), minlength=num_images)
    counts = [int(m) for m in counts if m > 0]
    metrics = {f"image_retrieval_recall@{k}": min(1.0, k / num_images) for k in ks}
    for k in ks:
        k_eff = min(k, num_texts)
        hits = [1 - math.comb(num_texts - m, k_eff) / math.comb(num_texts, k_eff) for m in counts]
        metrics[f"text_retrieval_recall@{k}"] = sum(hits) / len(hits)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics
