"""Retrieval recall@k from embeddings, in bounded memory, re-ranking, and the chance baseline.

Scores are computed one block of queries at a time (`chunk` x #candidates), so 5k images x 25k
captions never materialise the full 5k x 25k matrix (nor its argsort). For every query we only
need the rank of its best positive: the number of negatives scoring at least as high. Ties count
against the query, so a collapsed model (all embeddings equal) scores 0, not 1.

Re-ranking (ALBEF/BLIP): each query's top `rerank_k` candidates by ITC are put in the order of a
pair score, the rest keep their ITC order below them. The score is the ITM head's match log-odds
plus the ITC logit (the cosine times the model's learnt logit scale): a product of the two
experts, log p_ITC + log-odds_ITM up to a per-query constant, so the fused encoder re-orders
where it is confident and ITC decides where it is not (with `itc_weight=0`, ITM alone, as
ALBEF). The pairs of both directions are scored in one call, each distinct pair once.

Large candidate sets go through an exact inner-product index, faiss's IndexFlatIP, when faiss is
installed (`pip install 'vlp[faiss]'`): each query needs only its nearest max(k) + its positives
(and the re-ranked top), which the index finds in bounded memory with optimised kernels, where the
torch path scores whole blocks of candidates on the host. Recalls are identical (the ranks below
max(k) are exact; deeper ones only need to stay deeper).

Key names follow CLIP_benchmark: `image_retrieval_recall@k` is text->image (a caption retrieves
its image), `text_retrieval_recall@k` is image->text (an image retrieves any of its captions).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable, Literal, Sequence

import torch

# (text indices (P,), image indices (P,)) -> score of each (text, image) pair (P,), higher = match
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Search = Literal["auto", "torch", "faiss"]
FAISS_MIN_CANDIDATES = 20_000  # below, the torch path is as fast and needs no index


def itc_ranks(query_emb: torch.Tensor, cand_emb: torch.Tensor, positives: torch.Tensor,
              chunk: int = 1024, top_k: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank (0 = first) of each query's best-scoring positive, and its top `top_k` candidates.

    positives (N_query, P): candidate indices of each query's positives, padded with -1. Returns
    (ranks (N_query,), -1 for a query without positive; top candidates (N_query, top_k); their
    similarities (N_query, top_k)).
    """
    query_emb, cand_emb = query_emb.float(), cand_emb.float()
    ranks = torch.empty(len(query_emb), dtype=torch.long)
    top = torch.empty(len(query_emb), min(top_k, len(cand_emb)), dtype=torch.long)
    top_sims = torch.empty(top.shape)
    for start in range(0, len(query_emb), chunk):
        idx = torch.arange(start, min(start + chunk, len(query_emb)))
        scores = query_emb[idx] @ cand_emb.T  # (Q, N)
        pos = positives[idx]  # (Q, P)
        pos_scores = scores.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, float("-inf"))
        best = pos_scores.amax(dim=1, keepdim=True)  # (Q, 1)
        # candidates at least as good as the best positive, minus the positives among them
        rank = (scores >= best).sum(dim=1) - (pos_scores >= best).sum(dim=1)
        ranks[idx] = torch.where(pos.ge(0).any(dim=1), rank, torch.full_like(rank, -1))
        if top.size(1):
            top_sims[idx], top[idx] = scores.topk(top.size(1), dim=1)
    return ranks, top, top_sims


def index_ranks(query_emb: torch.Tensor, cand_emb: torch.Tensor, positives: torch.Tensor,
                top_k: int, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`itc_ranks` through faiss's exact IndexFlatIP: each query's nearest depth + P candidates
    (P: positives per query). A rank below `depth` is exact; a deeper one comes back as `depth`
    or more (its best positive is not among them, or negatives tie with it past the list)."""
    import faiss

    query_emb, cand_emb = (e.detach().float().cpu().contiguous() for e in (query_emb, cand_emb))
    index = faiss.IndexFlatIP(cand_emb.size(1))
    index.add(cand_emb.numpy())
    found = min(len(cand_emb), max(depth, top_k) + positives.size(1))
    sims, ids = (torch.from_numpy(a) for a in index.search(query_emb.numpy(), found))
    is_pos = (ids[:, :, None] == positives[:, None, :]).any(dim=2)  # (Q, found)
    best = sims.masked_fill(~is_pos, float("-inf")).amax(dim=1, keepdim=True)
    rank = ((sims >= best) & ~is_pos).sum(dim=1)
    rank = torch.where(is_pos.any(dim=1), rank, torch.full_like(rank, depth))
    ranks = torch.where(positives.ge(0).any(dim=1), rank, torch.full_like(rank, -1))
    k = min(top_k, len(cand_emb))
    return ranks, ids[:, :k], sims[:, :k]


def ranks_by(search: Search, query_emb: torch.Tensor, cand_emb: torch.Tensor,
             positives: torch.Tensor, chunk: int, top_k: int, depth: int):
    """itc_ranks or index_ranks: `auto` takes the index for FAISS_MIN_CANDIDATES or more
    candidates when faiss is installed."""
    if search == "auto":
        installed = importlib.util.find_spec("faiss") is not None
        search = "faiss" if installed and len(cand_emb) >= FAISS_MIN_CANDIDATES else "torch"
    if search == "faiss":
        return index_ranks(query_emb, cand_emb, positives, top_k, depth)
    return itc_ranks(query_emb, cand_emb, positives, chunk, top_k)


def reranked_ranks(ranks: torch.Tensor, top: torch.Tensor, top_scores: torch.Tensor,
                   positives: torch.Tensor) -> torch.Tensor:
    """Ranks after ordering each query's top candidates (Q, K) by `top_scores` (Q, K).

    A query with a positive among its top K gets its best positive's place in the new order;
    one without keeps its ITC rank (which is K or more).
    """
    is_pos = (top[:, :, None] == positives[:, None, :]).any(dim=2)  # (Q, K)
    best = top_scores.masked_fill(~is_pos, float("-inf")).amax(dim=1, keepdim=True)
    ahead = (top_scores >= best) & ~is_pos  # negatives scoring at least as high
    return torch.where(is_pos.any(dim=1), ahead.sum(dim=1), ranks)


def retrieval_recalls(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    rerank_k: int = 0,
    pair_scorer: PairScorer | None = None,
    itc_weight: float = 0.0,
    search: Search = "auto",
) -> dict[str, float]:
    """Text->image and image->text recall@k and their mean, CLIP_benchmark key names.

    image_emb (N_img, D) and text_emb (N_txt, D) are L2-normalised; text_to_image[t] is the image
    of caption t. Images without captions stay in the text->image gallery and are left out of the
    image->text average. With `pair_scorer` and `rerank_k`, each query's top `rerank_k` are also
    re-ranked by the scorer's score plus `itc_weight` times the cosine, and the same metrics after
    re-ranking are added as "reranked_<key>". `search`: how candidates are scored (ranks_by).
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(t2i) != len(text_emb):
        raise ValueError(f"text_to_image has {len(t2i)} entries for {len(text_emb)} captions")
    k = rerank_k if pair_scorer is not None else 0
    t2i_pos, i2t_pos = t2i[:, None], captions_per_image(t2i, len(image_emb))
    depth = max(ks)
    t2i_ranks, t2i_top, t2i_sims = ranks_by(search, text_emb, image_emb, t2i_pos, chunk, k,
                                            depth)  # images
    i2t_ranks, i2t_top, i2t_sims = ranks_by(search, image_emb, text_emb, i2t_pos, chunk, k,
                                            depth)  # captions
    has_caption = i2t_ranks >= 0
    metrics = recalls_from_ranks(t2i_ranks, i2t_ranks[has_caption], ks)
    if k:
        t2i_scores, i2t_scores = score_pairs(pair_scorer, t2i_top, i2t_top)
        t2i_ranks = reranked_ranks(t2i_ranks, t2i_top, t2i_scores + itc_weight * t2i_sims,
                                   t2i_pos)
        i2t_ranks = reranked_ranks(i2t_ranks, i2t_top, i2t_scores + itc_weight * i2t_sims,
                                   i2t_pos)
        reranked = recalls_from_ranks(t2i_ranks, i2t_ranks[has_caption], ks)
        metrics.update({f"reranked_{key}": value for key, value in reranked.items()})
    return metrics


def score_pairs(scorer: PairScorer, t2i_top: torch.Tensor, i2t_top: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every (caption, image) pair in the top candidates of both directions, each
    distinct pair scored once: (t2i scores (N_txt, K), i2t scores (N_img, K))."""
    n_txt, n_img = len(t2i_top), len(i2t_top)
    t2i_pairs = torch.arange(n_txt)[:, None] * n_img + t2i_top  # text * n_img + image
    i2t_pairs = i2t_top * n_img + torch.arange(n_img)[:, None]
    unique, inverse = torch.unique(torch.cat([t2i_pairs.flatten(), i2t_pairs.flatten()]),
                                   return_inverse=True)
    scores = scorer(unique // n_img, unique % n_img).float()[inverse]
    return scores[:t2i_pairs.numel()].view_as(t2i_top), scores[t2i_pairs.numel():].view_as(i2t_top)


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
