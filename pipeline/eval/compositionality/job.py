"""Edited-caption accuracy per kind of edit, by ITC and by ITM (SugarCrepe's and ARO's metric).

For each item the true caption must score higher than the edited one with the image: by the
dual encoder's cosine similarity (ITC) and by the fusion encoder's match log-odds (ITM). Chance
is 50%. The ITC accuracy bounds what a bag-of-words model can do on swaps (their two captions
hold the same words); the ITM accuracy is what cross-attention adds.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.pipeline.data.model_loading import LoadedModel, load_model, require_full_model
from vlp.pipeline.eval.compositionality.data import EditedItem, load_edit_sets
from vlp.pipeline.eval.configs import CompositionalityConfig
from vlp.pipeline.eval.encode import encode_images, encode_texts
from vlp.pipeline.eval.images import ImageRef
from vlp.pipeline.eval.results import write_result
from vlp.pipeline.eval.retrieval.data import RetrievalSet
from vlp.pipeline.eval.retrieval.job import ItmScorer


def evaluate_compositionality(checkpoint: str | Path | LoadedModel,
                              config: CompositionalityConfig, *,
                              out: str | Path | None = None, device: str = "cpu") -> dict:
    """Accuracy of true over edited caption per edit kind ("<kind>/itc", "<kind>/itm") and
    averaged over kinds ("mean/itc", "mean/itm"), with chance (0.5 for either scorer, the
    nightly job's "<variant>/<metric>" convention) as the baseline.

    `edits`: a SugarCrepe folder or file, or an ARO JSON (data.py), images under `image_root`;
    read and checked before a checkpoint path is loaded (onto `device`).
    """
    sets = load_edit_sets(config.edits, config.image_root)
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    itm, batch_size, bf16 = config.itm, config.batch_size, config.bf16
    if itm:
        require_full_model(loaded, "ITM scoring of edited captions (itm=True)")
    start = time.perf_counter()
    kinds = [kind for kind, items in sets.items() for _ in items]
    data = _as_retrieval_set([item for items in sets.values() for item in items])
    image_emb = encode_images(loaded.model, data.images, loaded.info.config["image_size"],
                              batch_size, bf16)  # each image once, whatever kinds it is in
    text_emb = encode_texts(loaded.model, loaded.tokenizer, data.captions,
                            loaded.info.config["max_text_len"], batch_size * 4, bf16)
    scores = {"itc": (text_emb * image_emb[data.text_to_image]).sum(dim=1)}
    if itm:
        scores["itm"] = ItmScorer(loaded, data, batch_size, bf16)(
            torch.arange(len(data.captions)), torch.tensor(data.text_to_image))
    metrics = {}
    for name, score in scores.items():
        true, edited = score.view(-1, 2).unbind(dim=1)  # captions are (true, edited) pairs
        for kind in sets:
            of_kind = torch.tensor([k == kind for k in kinds])
            metrics[f"{kind}/{name}"] = float((true > edited)[of_kind].float().mean())
    scorers = ("itc", "itm") if itm else ("itc",)
    for name in scorers:
        per_kind = [metrics[f"{kind}/{name}"] for kind in sets]
        metrics[f"mean/{name}"] = sum(per_kind) / len(per_kind)
    result = {
        "task": "compositionality",
        "dataset": str(config.edits),
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_items": {kind: len(items) for kind, items in sets.items()},
        "metrics": metrics,
        "baselines": {"chance": dict.fromkeys(scorers, 0.5)},  # per scorer, every kind
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_result(result, out)
    return result


@dataclass(frozen=True)
class CroppedImage(ImageRef):
    """An image file read as the crop of `box` (ARO's relation box), re-encoded as PNG."""

    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def read(self) -> bytes:
        from PIL import Image

        with Image.open(self.path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").crop(self.box).save(buffer, format="PNG")
        return buffer.getvalue()


def _as_retrieval_set(items: list[EditedItem]) -> RetrievalSet:
    """Images (one per distinct image and box) and the captions as (true, edited) pairs."""
    refs: dict[tuple, int] = {}
    images, captions, text_to_image = [], [], []
    for item in items:
        key = (item.image, item.box)
        if key not in refs:
            refs[key] = len(images)
            images.append(ImageRef(str(item.image)) if item.box is None
                          else CroppedImage(str(item.image), box=item.box))
        captions += [item.caption, item.negative]
        text_to_image += [refs[key]] * 2
    return RetrievalSet(images, captions, text_to_image, source="edited captions")
