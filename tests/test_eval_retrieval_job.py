"""The retrieval job's wiring on a hand-written 4-image split with the tiny untrained model: the
result equals recall computed directly from the encoders, re-ranking passes the ITM scorer and
the ITC weight, the scorer gives each pair the model's own match log-odds with every caption and
image encoded once, bf16 and the device reach every pass, and only rank 0 writes. The job on the
synthetic world is in tests/test_eval_jobs.py."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_support import spy_loading_and_autocast, tiny_model_on

from vlp.pipeline.data.checkpoints import CheckpointError
from vlp.pipeline.data.model_loading import LoadedModel
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.eval.configs import RetrievalConfig
from vlp.pipeline.eval.encode import encode_images, encode_texts
from vlp.pipeline.eval.images import load_image
from vlp.pipeline.eval.retrieval import job
from vlp.pipeline.eval.retrieval.data import load_karpathy
from vlp.pipeline.eval.retrieval.job import ItmScorer, evaluate_retrieval
from vlp.pipeline.eval.retrieval.recall import chance_recalls, retrieval_recalls

SCENES = [((220, 30, 30), ["a red square", "one red square"]),
          ((30, 30, 220), ["a blue circle", "one blue circle"]),
          ((30, 200, 30), ["a green cross", "one green cross"]),
          ((128, 128, 128), ["a grey square", "one grey square"])]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    images = []
    for i, (colour, captions) in enumerate(SCENES):
        Image.new("RGB", (48, 48), colour).save(root / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "test",
                       "sentences": [{"raw": c} for c in captions]})
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    texts = [c for _, captions in SCENES for c in captions] * 20
    return tiny_model_on(texts, tmp_path_factory.mktemp("tok"), vocab_size=40)


def config(split: Path, **settings) -> RetrievalConfig:
    return RetrievalConfig(karpathy_json=split / "dataset.json", image_root=split, **settings)


def expected_metrics(loaded, split, batch_size=64, chunk=1024, rerank_k=0) -> dict:
    dataset = load_karpathy(split / "dataset.json", split)
    image_emb = encode_images(loaded.model, dataset.images, loaded.info.config["image_size"])
    text_emb = encode_texts(loaded.model, loaded.tokenizer, dataset.captions,
                            loaded.info.config["max_text_len"])
    scorer = ItmScorer(loaded, dataset, batch_size, False) if rerank_k else None
    weight = float(loaded.model.itc_logit_scale().detach()) if rerank_k else 0.0
    return retrieval_recalls(image_emb, text_emb, dataset.text_to_image, chunk=chunk,
                             rerank_k=rerank_k, pair_scorer=scorer, itc_weight=weight)


def test_the_result_is_recall_of_the_encoders_with_chance_beside_it(split, loaded, tmp_path):
    out = tmp_path / "retrieval.json"
    result = evaluate_retrieval(loaded, config(split, chunk=3, batch_size=3), out=out)
    assert result["metrics"] == expected_metrics(loaded, split, chunk=3)
    assert result["baselines"] == {"chance": chance_recalls(4, [0, 0, 1, 1, 2, 2, 3, 3])}
    assert {k: result[k] for k in ("task", "dataset", "model", "step", "num_images",
                                   "num_texts", "rerank_k")} == {
        "task": "zeroshot_retrieval", "dataset": f"{split / 'dataset.json'}:test",
        "model": "memory", "step": None, "num_images": 4, "num_texts": 8, "rerank_k": 0}
    assert result["seconds"] >= 0 and json.loads(out.read_text()) == result


def test_re_ranking_uses_the_itm_scorer_and_the_itc_weight(split, loaded):
    result = evaluate_retrieval(loaded, config(split, rerank_k=2, batch_size=3))
    assert result["metrics"] == expected_metrics(loaded, split, batch_size=3, rerank_k=2)
    chance = chance_recalls(4, [0, 0, 1, 1, 2, 2, 3, 3])
    assert result["baselines"]["chance"] == {**chance,
                                             **{f"reranked_{k}": v for k, v in chance.items()}}
    assert result["rerank_k"] == 2


def test_the_split_named_is_read_and_re_ranking_one_candidate_keeps_the_chance_keys(split, loaded):
    data = json.loads((split / "dataset.json").read_text())
    for image in data["images"]:
        image["split"] = "val"
    (split / "val.json").write_text(json.dumps(data))
    result = evaluate_retrieval(loaded, RetrievalConfig(karpathy_json=split / "val.json",
                                                        image_root=split, split="val",
                                                        rerank_k=1))
    assert result["dataset"] == f"{split / 'val.json'}:val" and result["num_images"] == 4
    assert "reranked_image_retrieval_recall@1" in result["baselines"]["chance"]
    assert isinstance(result["seconds"], float) and 0 <= result["seconds"] < 600
    assert round(result["seconds"], 3) == result["seconds"]


def test_a_checkpoint_path_is_loaded_onto_the_device_given(split, loaded, monkeypatch):
    loads, _ = spy_loading_and_autocast(monkeypatch, job, loaded)
    evaluate_retrieval("runs/a", config(split))
    evaluate_retrieval("runs/b", config(split), device="cuda:1")
    assert loads == [("runs/a", "cpu"), ("runs/b", "cuda:1")]


def test_re_ranking_needs_the_fusion_layers(split, loaded):
    onnx = LoadedModel(loaded.model, loaded.tokenizer,
                       dataclasses.replace(loaded.info, kind="onnx", path="enc.onnx"))
    evaluate_retrieval(onnx, config(split))  # the embeddings alone are enough
    with pytest.raises(CheckpointError, match=r"^enc.onnx is an ONNX export .*; ITM re-ranking "
                                              r"\(rerank_k > 0\) needs the fusion layers"):
        evaluate_retrieval(onnx, config(split, rerank_k=1))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_scorer_gives_each_pair_the_model_s_match_log_odds(split, loaded, batch_size):
    dataset = load_karpathy(split / "dataset.json", split)
    texts, images = torch.tensor([0, 7, 3, 5, 7, 2, 0]), torch.tensor([3, 1, 0, 2, 3, 1, 1])
    scorer = ItmScorer(loaded, dataset, batch_size=batch_size, bf16=False)
    got = scorer(texts, images)
    pixels = torch.stack([load_image(dataset.images[i], 64) for i in images.tolist()])
    ids, mask = tokenize(loaded.tokenizer, [dataset.captions[t] for t in texts.tolist()],
                         loaded.info.config["max_text_len"])
    with torch.inference_mode():
        logits = loaded.model.itm_logits(pixels, ids, mask)
    torch.testing.assert_close(got, logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)
    assert sorted(scorer.text_states) == [0, 2, 3, 5, 7]


def test_each_caption_and_image_is_encoded_once(split, loaded, monkeypatch):
    dataset = load_karpathy(split / "dataset.json", split)
    model = loaded.model
    texts, images = [], []
    text_states, image_states = model.text_states, model.image_states
    monkeypatch.setattr(model, "text_states",
                        lambda ids, mask: texts.append(len(ids)) or text_states(ids, mask))
    monkeypatch.setattr(model, "image_states",
                        lambda pixels: images.append(len(pixels)) or image_states(pixels))
    scorer = ItmScorer(loaded, dataset, batch_size=2, bf16=False)
    scorer(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3]))
    scorer(torch.tensor([0, 1]), torch.tensor([2, 2]))
    assert texts == [8] and images == [2, 2, 1]  # captions once; images 2 per batch


def test_bf16_and_the_device_reach_every_pass(split, loaded, monkeypatch):
    loads, casts = spy_loading_and_autocast(monkeypatch, job, loaded)
    job_casts = []
    autocast = job.autocast
    monkeypatch.setattr(job, "autocast",
                        lambda device, bf16: job_casts.append(bf16) or autocast(device, bf16))
    evaluate_retrieval("a/checkpoint", config(split, rerank_k=1, bf16=True, batch_size=8),
                       device="cpu")
    assert loads == [("a/checkpoint", "cpu")]
    assert casts == [True, True] and job_casts and all(job_casts)


def test_only_rank_0_writes_the_result(split, loaded, tmp_path, one_rank):
    out = tmp_path / "rank0.json"
    result = evaluate_retrieval(loaded, config(split), out=out)
    assert json.loads(out.read_text()) == result


def test_retrieval_shards_give_the_result_of_the_json(split, loaded, tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i, (_, captions) in enumerate(SCENES):
            for ext, data in (("png", (split / f"{i}.png").read_bytes()),
                              ("txt", "\n".join(captions).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = evaluate_retrieval(loaded, RetrievalConfig(shards=(str(path),)))
    assert result["dataset"] == str(path) and result["num_texts"] == 8
    assert result["metrics"] == expected_metrics(loaded, split)
