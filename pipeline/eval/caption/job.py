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
from dataclasses import asdict
from pathlib import Path

from vlp.models.decoding import DecodingConfig
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel, load_model
from vlp.pipeline.eval.caption.baselines import most_frequent_caption, retrieved_captions
from vlp.pipeline.eval.caption.captioner import caption_images, finetune_captioning
from vlp.pipeline.eval.caption.data import load_test_split, load_train_pairs
from vlp.pipeline.eval.caption.metric import CaptionScorer
from vlp.pipeline.eval.configs import CaptionConfig
from vlp.pipeline.eval.finetune import FinetuneConfig
from vlp.pipeline.eval.results import write_result

NUM_EXAMPLES = 8  # test images whose captions the result (and the nightly report) shows


def evaluate_caption(checkpoint: str | Path | LoadedModel, config: CaptionConfig, *,
                     out: str | Path | None = None, results_out: str | Path | None = None,
                     device: str = "cpu") -> dict:
    """COCO caption metrics of the checkpoint's captions on `split`, with baselines.

    `steps` > 0 fine-tunes (all weights) on the (image, caption) pairs of `train_splits`
    first; with 0 the checkpoint must have been trained with the LM objective. The data is read
    and checked before a checkpoint path is loaded (onto `device`). `out` gets the metrics JSON
    and `results_out` (default: beside `out`, `<out stem>.results.json`) the captions in COCO's
    results format.
    """
    decoding = DecodingConfig(max_length=config.max_length, beam_size=config.beam_size,
                              length_penalty=config.length_penalty,
                              no_repeat_ngram_size=config.no_repeat_ngram_size)
    test = load_test_split(config.karpathy_json, config.image_root, config.split)
    train = load_train_pairs(config.karpathy_json, config.image_root, config.train_splits)
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    if config.steps == 0:
        _require_trained_lm(loaded)

    start = time.perf_counter()
    train_captions = [caption for _, caption in train]
    retrieved = retrieved_captions(loaded.model, loaded.tokenizer, test, train_captions,
                                   config.batch_size * 2, config.bf16)
    captions, skipped, finetune = _caption_test_images(loaded, train, test, config, decoding)
    scored = [image for image in test if image.image_id in captions]
    if not scored:
        raise UserError(f"none of the {len(test)} test images of {config.karpathy_json} decodes")
    frequent = most_frequent_caption(train_captions)
    with CaptionScorer({i.image_id: list(i.sentences) for i in scored}, config.spice) as scorer:
        metrics = scorer.score(captions)
        baselines = {"retrieval": scorer.score({i.image_id: retrieved[i.image_id]
                                                for i in scored}),
                     "most_frequent": scorer.score({i.image_id: frequent for i in scored})}
        spice_status = scorer.spice_status
    if spice_status.startswith("unavailable"):
        print(f"caption: SPICE {spice_status}", file=sys.stderr)
    result = {
        "task": "caption",
        "dataset": f"{config.karpathy_json}:{config.split}",
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_images": len(scored),
        "num_references": sum(len(i.sentences) for i in scored),
        "skipped_images": len(skipped),
        "num_train_pairs": len(train),
        "finetune": finetune,
        "decoding": asdict(decoding),
        "metrics": metrics,
        "baselines": baselines,
        "spice": spice_status,
        "most_frequent_caption": frequent,
        "examples": [{"image": str(i.image), "image_id": i.image_id,
                      "caption": captions[i.image_id], "retrieval": retrieved[i.image_id],
                      "references": list(i.sentences)} for i in scored[:NUM_EXAMPLES]],
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_result(result, out, [{"image_id": i.image_id, "caption": captions[i.image_id]}
                               for i in scored], results_out)
    return result


def _caption_test_images(loaded: LoadedModel, train, test, config: CaptionConfig,
                         decoding: DecodingConfig):
    """(captions by image id, skipped images, fine-tune stats or None): the test images
    captioned by the checkpoint, or by a fine-tuned copy when `config.steps` > 0 (the loaded
    model stays untouched for the caller)."""
    model, finetune = loaded.model, None
    if config.steps:
        model = copy.deepcopy(loaded.model)
        cfg = FinetuneConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                             finetune_backbone=True, bf16=config.bf16, seed=config.seed)
        finetune = finetune_captioning(model, loaded.tokenizer, train, cfg)
    captions, skipped = caption_images(model, loaded.tokenizer, test, decoding,
                                       config.batch_size * 2, config.bf16)
    return captions, skipped, finetune


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
