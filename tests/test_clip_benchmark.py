"""CLIP_benchmark's own evaluation functions on a vlp checkpoint, through the OpenCLIP-compatible
view and DataLoaders built from vlp's dataset readers: they must give the numbers `vlp eval
retrieval` and `vlp eval zeroshot` give on the same data."""
import pandas as pd
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image
from test_eval_support import tiny_eval_model, train_world_tokenizer

from vlp.models.model import LossWeights
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.data.transforms import image_to_tensor, preprocess_image
from vlp.pipeline.eval.classification.data import load_classification
from vlp.pipeline.eval.classification.zeroshot import evaluate_zeroshot
from vlp.pipeline.eval.configs import RetrievalConfig, ZeroShotConfig
from vlp.pipeline.eval.openclip import classification_loader, load_openclip, retrieval_loader
from vlp.pipeline.eval.retrieval.data import load_karpathy
from vlp.pipeline.eval.retrieval.job import evaluate_retrieval


@pytest.fixture(scope="module")
def checkpoint(world_dir, tmp_path_factory):
    """A tiny model trained for 20 contrastive steps on the world's training pairs, exported."""
    from vlp.models.export import save_pretrained

    tokenizer_json = train_world_tokenizer(world_dir, tmp_path_factory.mktemp("tok"))
    loaded = tiny_eval_model(tokenizer_json)
    model, config = loaded.model.train(), loaded.info.config
    model.loss_weights = LossWeights(itm=0, mlm=0)
    pairs = pd.read_parquet(world_dir / "train/url_list.parquet")
    images = torch.stack([preprocess_image((world_dir / url.split("/", 3)[3]).read_bytes(),
                                           config["image_size"]) for url in pairs["url"]])
    ids, mask = tokenize(loaded.tokenizer, list(pairs["caption"]), config["max_text_len"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = torch.randperm(len(images), generator=generator)[:32]
        loss = model(images[batch], ids[batch], mask[batch])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_pretrained(model.eval(), tmp_path_factory.mktemp("export"), tokenizer_json)


def test_openclip_view_matches_the_model(checkpoint, world_dir):
    model, transform, tokenizer = load_openclip(checkpoint)
    loaded = load_model(checkpoint)
    ids = tokenizer(["a red circle", "two shapes: a big blue square and a small grey cross"])
    assert ids.shape == (2, loaded.info.config["max_text_len"]) and ids.dtype == torch.long
    assert torch.equal(tokenizer("a red circle"), ids[:1])
    _, mask = tokenize(loaded.tokenizer, ["a red circle"], loaded.info.config["max_text_len"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids[:1]), loaded.model.encode_text(ids[:1], mask))
        image = Image.open(world_dir / "train/images/000000.jpg")
        pixels = transform(image)
        assert torch.equal(pixels, image_to_tensor(image.convert("RGB"), 64))
        assert torch.allclose(model.encode_image(pixels[None]),
                              loaded.model.encode_image(pixels[None]))
        features = model(pixels[None], ids)
    assert torch.allclose(features[0].norm(dim=-1), torch.ones(1))


def test_clip_benchmark_retrieval_agrees_with_vlp_eval_retrieval(checkpoint, world_dir):
    karpathy = world_dir / "retrieval/dataset_synth.json"
    image_root = world_dir / "retrieval"
    ours = evaluate_retrieval(
        checkpoint, RetrievalConfig(karpathy_json=karpathy, image_root=image_root)
    )
    model, _, tokenizer = load_openclip(checkpoint)
    loader = retrieval_loader(load_karpathy(karpathy, image_root), 64, batch_size=10)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    assert theirs == pytest.approx({k: v for k, v in ours["metrics"].items() if "@" in k})
    assert 0 < theirs["image_retrieval_recall@1"] < 1  # a model that ranks, and ranks wrongly


def topk_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` with the fix of LAION-AI/CLIP_benchmark#147: it turns a
    one-element array into a float with float(), which NumPy 2.4 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_clip_benchmark_zeroshot_agrees_with_vlp_eval_zeroshot(
    checkpoint, world_dir, task, monkeypatch
):
    monkeypatch.setattr(zeroshot_classification, "accuracy", topk_accuracy)
    root = world_dir / "classification" / task / "wds"
    ours = evaluate_zeroshot(checkpoint, ZeroShotConfig(dataset=root))
    model, _, tokenizer = load_openclip(checkpoint)
    dataset = load_classification(root)
    loader = classification_loader(dataset, 64, batch_size=5)
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classnames,
                                              dataset.templates, "cpu", amp=False)
    assert theirs == pytest.approx(ours["metrics"])
