"""Zero-shot image-text retrieval: encode a test set, recall@k both ways, optional ITM re-ranking.

Re-ranking follows ALBEF/BLIP: for each query the top `rerank_k` candidates by ITC similarity are
scored by the fusion encoder and get ITC + P(match) as their score; the rest keep ITC. P(match) is
a probability in [0, 1], so re-ranking reorders the top-k among themselves and nothing else.
Under torch.distributed the encoding is split across ranks; scoring runs on every rank, and so
does re-ranking, unsplit: its rerank_k x (captions + images) fused passes usually cost more than
the encoding, so re-rank on one rank. Rank 0 writes the result.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlp.pipeline.data.checkpoints import LoadedModel, load_model, require_full_model
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import write_json_atomic
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.eval.encode import autocast, encode_images, encode_texts, model_device
from vlp.pipeline.eval.images import load_image
from vlp.pipeline.eval.retrieval.data import RetrievalSet, load_karpathy, load_retrieval_shards
from vlp.pipeline.eval.retrieval.recall import chance_recalls, retrieval_recalls


def evaluate_retrieval(
    checkpoint: str | Path | LoadedModel,
    *,
    karpathy_json: str | Path | None = None,
    image_root: str | Path | None = None,
    split: str = "test",
    shards: str | list[str] | None = None,
    rerank_k: int = 0,
    batch_size: int = 64,
    chunk: int = 1024,
    bf16: bool = False,
    out: str | Path | None = None,
) -> dict:
    """Recall@1/5/10 both ways and mean recall, with chance baselines (CLIP_benchmark layout).

    The test set is a Karpathy JSON + image root or retrieval webdataset `shards`. `checkpoint` is
    any path `load_model` accepts, or an already loaded LoadedModel. Writes `out` (rank 0).
    """
    if (karpathy_json is None) == (shards is None):
        raise UserError("give either karpathy_json (+ image_root) or shards, not both/neither")
    if karpathy_json is not None:
        if image_root is None:
            raise UserError("karpathy_json needs image_root (the folder the filepaths are in)")
        dataset = load_karpathy(karpathy_json, image_root, split)
    else:
        dataset = load_retrieval_shards(shards)
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint)
    config = loaded.info.config
    start = time.perf_counter()
    image_emb = encode_images(loaded.model, dataset.images, config["image_size"], batch_size, bf16)
    text_emb = encode_texts(loaded.model, loaded.tokenizer, dataset.captions,
                            config["max_text_len"], batch_size * 4, bf16)
    rerankers = {}
    if rerank_k > 0:
        require_full_model(loaded, "ITM re-ranking (rerank_k > 0)")
        itm = ItmScorer(loaded, dataset, batch_size, bf16)
        rerankers = {"rerank_t2i": itm.text_queries, "rerank_i2t": itm.image_queries}
    metrics = retrieval_recalls(image_emb, text_emb, dataset.text_to_image, chunk=chunk,
                                rerank_k=rerank_k, **rerankers)
    result = {
        "task": "zeroshot_retrieval",
        "dataset": dataset.source,
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_images": len(dataset.images),
        "num_texts": len(dataset.captions),
        "rerank_k": rerank_k,
        "metrics": metrics,
        "baselines": {"chance": chance_recalls(len(dataset.images), dataset.text_to_image)},
        "seconds": round(time.perf_counter() - start, 3),
    }
    if out is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        write_json_atomic(out, result)
    return result


class ItmScorer:
    """P(match) from the fusion encoder for (text, image) pairs of a retrieval set, batched."""

    def __init__(self, loaded: LoadedModel, dataset: RetrievalSet, batch_size: int, bf16: bool):
        self.model, self.batch_size, self.bf16 = loaded.model, batch_size, bf16
        self.device = model_device(self.model)
        config = loaded.info.config
        self.ids, self.mask = tokenize(loaded.tokenizer, dataset.captions, config["max_text_len"])
        # Candidates repeat across neighbouring queries; keep recently decoded images.
        self.image = functools.lru_cache(maxsize=512)(
            lambda i: load_image(dataset.images[i], config["image_size"])
        )

    @torch.inference_mode()
    def pairs(self, text_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        """(P,) match probabilities for the pairs (text_idx[p], image_idx[p])."""
        probs = []
        for lo in range(0, len(text_idx), self.batch_size):
            t = text_idx[lo : lo + self.batch_size]
            images = torch.stack([self.image(int(i)) for i in image_idx[lo : lo + self.batch_size]])
            with autocast(self.device, self.bf16):
                logits = self.model.itm_logits(images.to(self.device), self.ids[t].to(self.device),
                                               self.mask[t].to(self.device))
            probs.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(probs)

    def text_queries(self, texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Bonus (Q, K) for text queries (Q,) and their candidate images (Q, K)."""
        pair_texts = texts[:, None].expand_as(images).reshape(-1)
        return self.pairs(pair_texts, images.reshape(-1)).view_as(images)

    def image_queries(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Bonus (Q, K) for image queries (Q,) and their candidate captions (Q, K)."""
        pair_images = images[:, None].expand_as(texts).reshape(-1)
        return self.pairs(texts.reshape(-1), pair_images).view_as(texts)
