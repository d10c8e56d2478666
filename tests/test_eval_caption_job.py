"""The captioning job's bookkeeping on a hand-written Karpathy split, with the tiny untrained model
and a recording scorer in place of the COCO metrics: which images are captioned and scored, what
each baseline is, what the result and the COCO results file hold, the fine-tune on a copy, and
the captioner's batching, skipping and decoding. The job with the real metrics on the synthetic
world is in tests/test_eval_caption.py."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_support import spy_loading_and_autocast, tiny_model_on

from vlp.models.decoding import DecodingConfig, generate
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel
from vlp.pipeline.eval import encode, finetune
from vlp.pipeline.eval.caption import baselines, captioner, job
from vlp.pipeline.eval.caption.baselines import retrieved_captions
from vlp.pipeline.eval.caption.captioner import (
    caption_images,
    finetune_captioning,
    image_batches,
    special_ids,
)
from vlp.pipeline.eval.configs import CaptionConfig
from vlp.pipeline.eval.finetune import FinetuneConfig
from vlp.pipeline.eval.images import load_images
from vlp.pipeline.eval.karpathy import read_karpathy

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30),
           "grey": (128, 128, 128)}
TRAIN = [("t0.png", "red", ["a red circle", "a red circle"]),
         ("t1.png", "blue", ["a blue square", "a red circle"]),
         ("t2.png", "green", ["a green cross"])]
TEST = [("s0.png", "red", ["a red circle", "one red circle"]),
        ("s1.png", "grey", ["a grey square"]),  # its file does not decode
        ("s2.png", "blue", ["a blue square", "a red circle", "one blue square"]),
        ("s3.png", "green", ["a green cross"])]
UNDECODABLE = "s1.png"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """Karpathy JSON with 3 training images (5 captions, 'a red circle' 3 times) and 4 test
    images (image ids 10-13, s1.png not an image)."""
    root = tmp_path_factory.mktemp("split")
    images = []
    for image_id, (name, colour, captions) in enumerate(TRAIN + TEST):
        if name == UNDECODABLE:
            (root / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (48, 48), COLOURS[colour]).save(root / name)
        split_name = "train" if image_id < len(TRAIN) else "test"
        images.append({"filename": name, "split": split_name, "imgid": image_id + 7,
                       "sentences": [{"raw": c} for c in captions]})
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    texts = [c for _, _, captions in TRAIN + TEST for c in captions] * 20
    return tiny_model_on(texts, tmp_path_factory.mktemp("tok"), vocab_size=58)


class RecordingScorer:
    """CaptionScorer's interface: scores each set of captions by the share that equals one of
    the image's references exactly, and records what it was given."""

    made: list["RecordingScorer"] = []

    def __init__(self, references: dict[int, list[str]], spice: bool = True):
        self.references, self.spice, self.scored = references, spice, []
        self.spice_status = "unavailable: recorded" if spice else "not requested"
        RecordingScorer.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def score(self, captions: dict[int, str]) -> dict[str, float]:
        assert set(captions) == set(self.references)
        self.scored.append(dict(captions))
        exact = [captions[i] in refs for i, refs in self.references.items()]
        return {"exact": sum(exact) / len(exact), "images": float(len(exact))}


def config(split: Path, **settings) -> CaptionConfig:
    defaults = {"karpathy_json": split / "dataset.json", "image_root": split, "steps": 2,
                "batch_size": 2, "max_length": 4}
    return CaptionConfig(**{**defaults, **settings})


@pytest.fixture
def scorer(monkeypatch):
    RecordingScorer.made = []
    monkeypatch.setattr(job, "CaptionScorer", RecordingScorer)
    return RecordingScorer.made


def test_the_job_scores_the_decodable_test_images_and_both_baselines(split, loaded, scorer,
                                                                       tmp_path, capfd):
    out = tmp_path / "caption.json"
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = job.evaluate_caption(loaded, config(split, spice=True, beam_size=2,
                                                 length_penalty=0.5, no_repeat_ngram_size=2,
                                                 lr=3e-4, seed=5),
                                  out=out)
    (made,) = scorer
    test = {i: refs for i, (_, _, refs) in enumerate(TEST, start=len(TRAIN) + 7)}
    assert made.references == {i: refs for i, refs in test.items() if i != 11}
    assert made.spice is True and result["spice"] == "unavailable: recorded"
    assert "caption: SPICE unavailable: recorded" in capfd.readouterr().err
    model_captions, retrieval, frequent = made.scored
    assert set(model_captions) == {10, 12, 13}
    assert set(frequent.values()) == {"a red circle"}  # 3 of the 5 training captions
    assert result["most_frequent_caption"] == "a red circle"
    test_images = read_karpathy(split / "dataset.json", split, ["test"])
    assert retrieval == {i: c for i, c in retrieved_captions(
        loaded.model, loaded.tokenizer, test_images, [c for _, _, cs in TRAIN for c in cs]
    ).items()}
    assert result["baselines"] == {"retrieval": made.score(retrieval),
                                   "most_frequent": {"exact": 2 / 3, "images": 3.0}}
    assert result["metrics"] == made.score(model_captions)
    assert result["task"] == "caption" and result["dataset"] == f"{split / 'dataset.json'}:test"
    assert (result["model"], result["step"]) == ("memory", None)
    assert (result["num_images"], result["num_references"]) == (3, 6)
    assert (result["skipped_images"], result["num_train_pairs"]) == (1, 5)
    assert result["decoding"] == {"max_length": 4, "beam_size": 2, "length_penalty": 0.5,
                                  "no_repeat_ngram_size": 2, "use_cache": True}
    train = [(image.image, caption) for image in read_karpathy(split / "dataset.json", split,
                                                               ["train"])
             for caption in image.sentences]
    direct = finetune_captioning(copy.deepcopy(loaded.model), loaded.tokenizer, train,
                                 FinetuneConfig(steps=2, lr=3e-4, batch_size=2,
                                                finetune_backbone=True, seed=5))
    assert {k: result["finetune"][k] for k in ("steps", "lr", "batch_size", "first_loss")} == {
        k: direct[k] for k in ("steps", "lr", "batch_size", "first_loss")}
    assert isinstance(result["seconds"], float) and 0 <= result["seconds"] < 600
    assert round(result["seconds"], 3) == result["seconds"]
    assert result["finetune"]["steps"] == 2 and result["finetune"]["train_pairs"] == 5
    assert result["finetune"]["skipped_images"] == 0
    assert result["examples"] == [
        {"image": str(split / name), "image_id": i, "caption": model_captions[i],
         "retrieval": retrieval[i], "references": refs}
        for i, (name, _, refs) in zip((10, 12, 13), [TEST[0], TEST[2], TEST[3]])]
    assert json.loads(out.read_text()) == result
    assert json.loads((tmp_path / "caption.results.json").read_text()) == [
        {"image_id": i, "caption": model_captions[i]} for i in (10, 12, 13)]
    # the fine-tune trained a copy: the loaded model and its objectives are untouched
    assert loaded.model.loss_weights.lm == 0
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())


def lm_trained(loaded: LoadedModel, step: int | None) -> LoadedModel:
    """A copy of `loaded` as if pretrained with the LM objective, at `step`."""
    model = copy.deepcopy(loaded.model)
    model.loss_weights.lm = 0.5
    return LoadedModel(model, loaded.tokenizer, dataclasses.replace(loaded.info, step=step))


def test_the_examples_are_the_first_scored_images(split, loaded, scorer, monkeypatch):
    monkeypatch.setattr(job, "NUM_EXAMPLES", 2)
    result = job.evaluate_caption(lm_trained(loaded, 3), config(split, steps=0, spice=False))
    assert [e["image_id"] for e in result["examples"]] == [10, 12]
    assert result["finetune"] is None and result["spice"] == "not requested"
    assert result["step"] == 3 and scorer[0].spice is False


def test_the_captions_go_to_the_results_file_asked_for(split, loaded, scorer, tmp_path):
    result = job.evaluate_caption(loaded, config(split, steps=1), out=tmp_path / "m.json",
                                  results_out=tmp_path / "coco" / "captions.json")
    written = json.loads((tmp_path / "coco" / "captions.json").read_text())
    assert [r["image_id"] for r in written] == [10, 12, 13]
    assert result["results_file"] == str(tmp_path / "coco" / "captions.json")


def test_a_checkpoint_path_is_loaded_after_the_data_onto_the_device_given(split, loaded, scorer,
                                                                          monkeypatch):
    loads, _ = spy_loading_and_autocast(monkeypatch, job, loaded)
    job.evaluate_caption("runs/a/checkpoints", config(split, steps=1))
    job.evaluate_caption("runs/b/checkpoints", config(split, steps=1), device="cuda:1")
    assert loads == [("runs/a/checkpoints", "cpu"), ("runs/b/checkpoints", "cuda:1")]


def test_without_a_fine_tune_the_checkpoint_must_have_trained_its_lm_head(split, loaded, scorer):
    with pytest.raises(UserError) as refused:
        job.evaluate_caption(loaded, config(split, steps=0))
    assert str(refused.value) == (
        "checkpoint memory was trained without the captioning (LM) objective, so its LM head is "
        "untrained: fine-tune it for captioning first with `vlp eval caption --steps N` (e.g. "
        "--steps 500; `steps:` in a nightly suite), or pretrain with "
        "`--set model.lm_weight=0.5`")
    with pytest.raises(UserError, match=r"^checkpoint memory is untrained \(step 0\): fine-"):
        job.evaluate_caption(lm_trained(loaded, 0), config(split, steps=0))
    assert scorer == []


def test_a_split_where_no_test_image_decodes_is_an_error(split, loaded, scorer, tmp_path):
    data = json.loads((split / "dataset.json").read_text())
    for image in data["images"]:
        if image["split"] == "test":
            image["filename"] = UNDECODABLE
            image["imgid"] += 100
    (split / "broken.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as refused:
        job.evaluate_caption(loaded, config(split, karpathy_json=split / "broken.json"))
    assert str(refused.value) == f"none of the 4 test images of {split / 'broken.json'} decodes"
    assert scorer == []


def test_special_ids_are_every_special_token_but_the_end_token(loaded):
    tokenizer = loaded.tokenizer
    ids = special_ids(tokenizer)
    assert ids == tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.sep_token_id}))
    assert list(ids) == sorted(ids) and tokenizer.sep_token_id not in ids
    assert tokenizer.cls_token_id in ids and tokenizer.pad_token_id in ids


def test_image_batches_skip_what_does_not_decode_and_count_every_image(split, capfd):
    images = read_karpathy(split / "dataset.json", split, ["test"])
    skipped = []
    batches = list(image_batches(images, 32, 2, skipped, "batches"))
    assert [[i.image_id for i in chunk] for chunk, _ in batches] == [[10], [12, 13]]
    assert [i.image_id for i in skipped] == [11]
    first, second = batches[0][1], batches[1][1]
    assert first.shape == (1, 3, 32, 32) and second.shape == (2, 3, 32, 32)
    assert first.dtype == torch.uint8
    expected = load_images([images[2].image, images[3].image], 32)
    assert torch.equal(second, expected)
    err = capfd.readouterr().err
    assert "batches: 2/4 (50%)" in err and "batches: 4/4 (100%)" in err
    assert re.search(r"batches: 4/4 \(100%\) \| [\d.]+ images/s", err)
    only_bad = [images[1], images[1]]
    assert list(image_batches(only_bad, 32, 1, skipped, "batches")) == []
    assert len(skipped) == 3


def test_caption_images_decodes_each_batch_as_generate_does(split, loaded, monkeypatch,
                                                             capfd):
    images = read_karpathy(split / "dataset.json", split, ["test"])
    decoding = DecodingConfig(max_length=5)
    casts = []
    autocast = captioner.autocast
    monkeypatch.setattr(captioner, "autocast",
                        lambda device, bf16: casts.append((device, bf16)) or autocast(device, bf16))
    captions, skipped = caption_images(loaded.model, loaded.tokenizer, images, decoding,
                                       batch_size=2, bf16=True)
    assert [i.image_id for i in skipped] == [11] and set(captions) == {10, 12, 13}
    assert casts == [(torch.device("cpu"), True)] * 2
    pixels = load_images([images[i].image for i in (0, 2, 3)], loaded.model.config.image_size)
    tokenizer = loaded.tokenizer
    with torch.inference_mode(), autocast(torch.device("cpu"), True):
        tokens = generate(loaded.model, pixels, tokenizer.cls_token_id, tokenizer.sep_token_id,
                          decoding, special_ids(tokenizer))
    assert [captions[i] for i in (10, 12, 13)] == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens]
    assert "caption decoding: 4/4 (100%)" in capfd.readouterr().err


def test_the_captioning_fine_tune_trains_the_lm_objective_alone(split, loaded, capfd):
    model = copy.deepcopy(loaded.model)
    train = [(image.image, caption) for image in read_karpathy(split / "dataset.json", split,
                                                               ["train"])
             for caption in image.sentences]
    bad = read_karpathy(split / "dataset.json", split, ["test"])[1].image
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = finetune_captioning(model, loaded.tokenizer, train + [(bad, "a grey square")],
                                FinetuneConfig(steps=3, lr=1e-3, batch_size=6,
                                               finetune_backbone=True))
    weights = model.loss_weights
    assert (weights.itc, weights.itm, weights.mlm, weights.vqa, weights.lm) == (0, 0, 0, 0, 1)
    assert stats["steps"] == 3 and stats["train_pairs"] == 6 and stats["skipped_images"] == 3
    assert stats["final_loss"] < stats["first_loss"]
    after = model.state_dict()
    assert not all(torch.equal(v, after[k]) for k, v in before.items())
    assert not model.training
    assert "caption fine-tune: 3/3 (100%)" in capfd.readouterr().err


def test_a_fine_tune_on_images_that_never_decode_leaves_the_model_as_it_was(split, loaded):
    model = copy.deepcopy(loaded.model)
    bad = read_karpathy(split / "dataset.json", split, ["test"])[1].image
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = finetune_captioning(model, loaded.tokenizer, [(bad, "a grey square")] * 2,
                                FinetuneConfig(steps=2, lr=1e-3, batch_size=2))
    assert stats["skipped_images"] == 4 and math.isnan(stats["first_loss"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bf16_reaches_the_fine_tune_the_decoding_and_the_retrieval_baseline(split, loaded,
                                                                            scorer, monkeypatch):
    casts = []
    for module in (encode, finetune, baselines, captioner):
        real = module.autocast
        monkeypatch.setattr(module, "autocast", lambda device, bf16, real=real, name=module:
                            casts.append((name.__name__.rsplit(".", 1)[-1], bf16))
                            or real(device, bf16))
    job.evaluate_caption(loaded, config(split, bf16=True, steps=1))
    assert {name for name, _ in casts} == {"encode", "finetune", "baselines", "captioner"}
    assert all(flag for _, flag in casts)
