"""Captioning evaluation of a checkpoint: optionally fine-tune, caption the test split, score it.

Steps: load the test split (references required) and the training captions (all files checked
first); if `steps` > 0, fine-tune a copy of the model for captioning with that fixed budget (the
loaded one is untouched); decode a caption per test image (greedy or beam search); score with the
official COCO caption metrics; write the metrics JSON and, beside it, the COCO results file
`[{"image_id": ..., "caption": ...}]`. Baselines beside the result, scored by the same code on
the same images: the retrieved training caption under the checkpoint's ITC (`retrieval`, the
primary baseline) and the most frequent training caption (`most_frequent`). Test images that do
not decode are skipped and counted; everything is scored on the others.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Sequence

from vlp.models.decoding import DecodingConfig
from vlp.pipeline.data.checkpoints import LoadedModel, load_model
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import write_json_atomic
from vlp.pipeline.eval.caption.baselines import most_frequent_caption, retrieved_captions
from vlp.pipeline.eval.caption.captioner import caption_images, finetune_captioning
from vlp.pipeline.eval.caption.data import load_test_split, load_train_pairs
from vlp.pipeline.eval.caption.metric import CaptionScorer
from vlp.pipeline.eval.finetune import FinetuneConfig

NUM_EXAMPLES = 8  # test images whose captions the result (and the nightly report) shows


def evaluate_caption(
    checkpoint: str | Path | LoadedModel,
    *,
    karpathy_json: str | Path,
    image_root: str | Path,
    split: str = "test",
    train_splits: Sequence[str] = ("train", "restval"),
    steps: int = 0,
    lr: float = 1e-4,
    batch_size: int = 32,
    beam_size: int = 1,
    max_length: int = 30,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    spice: bool = True,
    bf16: bool = False,
    seed: int = 0,
    out: str | Path | None = None,
    results_out: str | Path | None = None,
) -> dict:
    """COCO caption metrics of the checkpoint's captions on `split`, with baselines.

    `steps` > 0 fine-tunes (all weights, `lr`, `batch_size`) on the (image, caption) pairs of
    `train_splits` first; with 0 the checkpoint must have been trained with the LM objective.
    `out` gets the metrics JSON and `results_out` (default: beside `out`,
    `<out stem>.results.json`) the captions in COCO's results format.
    """
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    try:
        decoding = DecodingConfig(max_length=max_length, beam_size=beam_size,
                                  length_penalty=length_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
    except ValueError as exc:
        raise UserError(f"decoding: {exc}") from exc
    test = load_test_split(karpathy_json, image_root, split)
    train = load_train_pairs(karpathy_json, image_root, train_splits)
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint)
    if steps == 0:
        _require_trained_lm(loaded)

    start = time.perf_counter()
    train_captions = [caption for _, caption in train]
    retrieved = retrieved_captions(loaded.model, loaded.tokenizer, test, train_captions,
                                   batch_size * 2, bf16)
    model, finetune = loaded.model, None
    if steps:
        model = copy.deepcopy(loaded.model)
        cfg = FinetuneConfig(steps=steps, lr=lr, batch_size=batch_size, finetune_backbone=True,
                             bf16=bf16, seed=seed)
        finetune = finetune_captioning(model, loaded.tokenizer, train, cfg)
    captions, skipped = caption_images(model, loaded.tokenizer, test, decoding, batch_size * 2,
                                       bf16)
    del model
    scored = [image for image in test if image.image_id in captions]
    if not scored:
        raise UserError(f"none of the {len(test)} test images of {karpathy_json} decodes")
    frequent = most_frequent_caption(train_captions)
    with CaptionScorer({i.image_id: list(i.sentences) for i in scored}, spice) as scorer:
        metrics = scorer.score(captions)
        baselines = {"retrieval": scorer.score({i.image_id: retrieved[i.image_id]
                                                for i in scored}),
                     "most_frequent": scorer.score({i.image_id: frequent for i in scored})}
        spice_status = scorer.spice_status
    if spice_status.startswith("unavailable"):
        print(f"caption: SPICE {spice_status}", file=sys.stderr)
    result = {
        "task": "caption",
        "dataset": f"{karpathy_json}:{split}",
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_images": len(scored),
        "num_references": sum(len(i.sentences) for i in scored),
        "skipped_images": len(skipped),
        "num_train_pairs": len(train),
        "finetune": finetune,
        "decoding": {"beam_size": beam_size, "max_length": max_length,
                     "length_penalty": length_penalty,
                     "no_repeat_ngram_size": no_repeat_ngram_size},
        "metrics": metrics,
        "baselines": baselines,
        "spice": spice_status,
        "most_frequent_caption": frequent,
        "examples": [{"image": str(i.image), "image_id": i.image_id,
                      "caption": captions[i.image_id], "retrieval": retrieved[i.image_id],
                      "references": list(i.sentences)} for i in scored[:NUM_EXAMPLES]],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if out is not None or results_out is not None:
        results_out = Path(results_out or Path(out).with_suffix(".results.json"))
        write_json_atomic(results_out, [{"image_id": i.image_id, "caption": captions[i.image_id]}
                                        for i in scored])
        result["results_file"] = str(results_out)
    if out is not None:
        write_json_atomic(out, result)
    return result


def _require_trained_lm(loaded: LoadedModel) -> None:
    """Without a fine-tune, the checkpoint's own captioning (LM) head must have been trained."""
    weights = loaded.model.loss_weights
    if weights.lm and loaded.info.step != 0:
        return
    why = ("is untrained (step 0)" if weights.lm else
           "was trained without the captioning (LM) objective, so its LM head is untrained")
    raise UserError(
        f"checkpoint {loaded.info.path} {why}: fine-tune it for captioning first with "
        "`vlp eval caption --steps N` (e.g. --steps 500; `steps:` in a nightly suite), or "
        "pretrain with `--set model.lm_weight=0.5`"
    )
