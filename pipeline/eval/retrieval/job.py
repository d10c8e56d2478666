"""Zero-shot image-text retrieval: encode a test set, recall@k both ways, optional ITM re-ranking.

Re-ranking follows ALBEF: each query's top `rerank_k` candidates by ITC similarity are put in the
order of the fusion encoder's match log-odds; the rest keep their ITC order below them. The result
then holds both the ITC recalls and the re-ranked ones ("reranked_<key>"), side by side. Every
distinct (caption, image) pair of both directions is scored once; a caption's bottom states are
computed once and an image's fused-layer memory once (ItmScorer).
Under torch.distributed the encoding is split across ranks; scoring runs on every rank, and so
does re-ranking, unsplit: its fused passes usually cost more than the encoding, so re-rank on one
rank. Rank 0 writes the result.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlp.pipeline.data.model_loading import LoadedModel, load_model, require_full_model
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.eval.configs import RetrievalConfig
from vlp.pipeline.eval.encode import autocast, encode_images, encode_texts, model_device
from vlp.pipeline.eval.images import load_image
from vlp.pipeline.eval.results import write_result
from vlp.pipeline.eval.retrieval.data import RetrievalSet, load_karpathy, load_retrieval_shards
from vlp.pipeline.eval.retrieval.recall import chance_recalls, retrieval_recalls
from vlp.pipeline.progress import ProgressLine


def evaluate_retrieval(checkpoint: str | Path | LoadedModel, config: RetrievalConfig, *,
                       out: str | Path | None = None, device: str = "cpu") -> dict:
    """Recall@1/5/10 both ways and mean recall, with chance baselines (CLIP_benchmark layout).

    `checkpoint` is any path `load_model` accepts (loaded onto `device` after the test set is
    read and checked), or an already loaded LoadedModel. Writes `out` (rank 0).
    """
    if config.karpathy_json is not None:
        dataset = load_karpathy(config.karpathy_json, config.image_root, config.split)
    else:
        dataset = load_retrieval_shards(list(config.shards))
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    model_config = loaded.info.config
    start = time.perf_counter()
    batch_size, bf16, rerank_k = config.batch_size, config.bf16, config.rerank_k
    image_emb = encode_images(loaded.model, dataset.images, model_config["image_size"],
                              batch_size, bf16)
    text_emb = encode_texts(loaded.model, loaded.tokenizer, dataset.captions,
                            model_config["max_text_len"], batch_size * 4, bf16)
    scorer = None
    if rerank_k > 0:
        require_full_model(loaded, "ITM re-ranking (rerank_k > 0)")
        scorer = ItmScorer(loaded, dataset, batch_size, bf16)
    itc_weight = float(loaded.model.itc_logit_scale().detach()) if scorer is not None else 0.0
    metrics = retrieval_recalls(image_emb, text_emb, dataset.text_to_image, chunk=config.chunk,
                                rerank_k=rerank_k, pair_scorer=scorer, itc_weight=itc_weight)
    result = {
        "task": "zeroshot_retrieval",
        "dataset": dataset.source,
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_images": len(dataset.images),
        "num_texts": len(dataset.captions),
        "rerank_k": rerank_k,
        "metrics": metrics,
        "baselines": {"chance": _chance(len(dataset.images), dataset.text_to_image, rerank_k)},
        "seconds": round(time.perf_counter() - start, 3),
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_result(result, out)
    return result


def _chance(num_images: int, text_to_image, rerank_k: int) -> dict[str, float]:
    """Chance recalls, also under the re-ranked keys (a random ranking stays random)."""
    chance = chance_recalls(num_images, text_to_image)
    if rerank_k > 0:
        chance.update({f"reranked_{key}": value for key, value in list(chance.items())})
    return chance


class ItmScorer:
    """Match log-odds of the fusion encoder for (caption, image) pairs of a retrieval set.

    Pairs are grouped by image: `batch_size` images at a time are decoded and their memory (the
    keys and values the fused layers attend to) computed once, then all pairs of those images
    go through the fused layers in batches, with the captions' bottom states (computed once per
    caption, kept on the host) gathered in.
    """

    def __init__(self, loaded: LoadedModel, dataset: RetrievalSet, batch_size: int, bf16: bool):
        self.model, self.dataset, self.bf16 = loaded.model, dataset, bf16
        self.batch_size = batch_size
        self.device = model_device(self.model)
        self.image_size = loaded.info.config["image_size"]
        self.ids, self.mask = tokenize(loaded.tokenizer, dataset.captions,
                                       loaded.info.config["max_text_len"])
        self.text_states: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def __call__(self, text_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        """(P,) match log-odds, logit(match) - logit(no match), for pairs (text, image)."""
        self._encode_texts(torch.unique(text_idx))
        scores = torch.empty(len(text_idx))
        order = torch.argsort(image_idx, stable=True)
        images = torch.unique(image_idx)
        with ProgressLine("ITM scoring", len(text_idx), "pair") as progress:
            for lo in range(0, len(images), self.batch_size):
                chunk = images[lo:lo + self.batch_size]
                memory = self._memory(chunk)
                pairs = order[torch.isin(image_idx[order], chunk)]
                slot = torch.searchsorted(chunk, image_idx[pairs])  # image -> its chunk place
                for start in range(0, len(pairs), self.batch_size * 4):
                    batch = slice(start, start + self.batch_size * 4)
                    scores[pairs[batch]] = self._score(memory, slot[batch],
                                                       text_idx[pairs[batch]])
                    progress.update(len(pairs[batch]))
        return scores

    def _encode_texts(self, needed: torch.Tensor) -> None:
        todo = [int(t) for t in needed if int(t) not in self.text_states]
        for lo in range(0, len(todo), self.batch_size * 4):
            idx = torch.tensor(todo[lo:lo + self.batch_size * 4])
            with autocast(self.device, self.bf16):
                states = self.model.text_states(self.ids[idx].to(self.device),
                                                self.mask[idx].to(self.device))
            for i, state in zip(idx.tolist(), states.cpu()):
                self.text_states[i] = state

    def _memory(self, images: torch.Tensor):
        pixels = torch.stack([load_image(self.dataset.images[int(i)], self.image_size)
                              for i in images]).to(self.device)
        with autocast(self.device, self.bf16):
            return self.model.image_memory(self.model.image_states(pixels))

    def _score(self, memory, slot: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        slot = slot.to(self.device)
        states = torch.stack([self.text_states[int(t)] for t in texts]).to(self.device)
        with autocast(self.device, self.bf16):
            logits = self.model.itm_scores(memory.select(slot), states,
                                           self.mask[texts].to(self.device))
        logits = logits.float()
        return (logits[:, 1] - logits[:, 0]).cpu()
