"""Retrieval test sets from a hand-written Karpathy JSON and hand-written shards: what each loads
to (captions in order, each caption's image, the image bytes) and each bad input's exact message.
The retrieval job on the synthetic world is in tests/test_eval_jobs.py."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.retrieval.data import RetrievalSet, load_karpathy, load_retrieval_shards


def karpathy(tmp_path: Path, images: list[dict]) -> Path:
    for entry in images:
        (tmp_path / entry["filename"]).write_bytes(entry["filename"].encode())
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    return path


def entry(filename: str, split: str, *captions: str) -> dict:
    return {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}


def shard(path: Path, samples: list[dict[str, bytes]]) -> str:
    """An uncompressed webdataset tar of `samples` ({"__key__": key, ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_karpathy_split_flattens_the_captions_in_order_each_with_its_image(tmp_path):
    path = karpathy(tmp_path, [entry("a.jpg", "test", "a one", "a two"),
                               entry("b.jpg", "train", "b one"),
                               entry("c.jpg", "test", "c one", "c two", "c three")])
    data = load_karpathy(path, tmp_path)
    assert data.captions == ["a one", "a two", "c one", "c two", "c three"]
    assert data.text_to_image == [0, 0, 1, 1, 1]
    assert [ref.read() for ref in data.images] == [b"a.jpg", b"c.jpg"]
    assert data.source == f"{path}:test"
    train = load_karpathy(path, tmp_path, split="train")
    assert (train.captions, train.text_to_image, train.source) == (["b one"], [0], f"{path}:train")


def test_a_split_without_captions_is_an_empty_set(tmp_path):
    path = karpathy(tmp_path, [entry("a.jpg", "test"), entry("b.jpg", "test")])
    with pytest.raises(UserError) as refused:
        load_karpathy(path, tmp_path)
    assert str(refused.value) == f"{path}:test: empty retrieval set (2 images, 0 captions)"


def test_shards_give_each_caption_line_its_image_across_shards(tmp_path):
    first = shard(tmp_path / "0.tar", [
        {"__key__": b"a", "jpg": b"image a", "txt": b"a one\n\n  a two  \n"},
        {"__key__": b"b", "png": b"image b", "txt": b"b one"}])
    shard(tmp_path / "1.tar", [{"__key__": b"c", "webp": b"image c", "txt": b"c one\nc two\n"}])
    data = load_retrieval_shards(str(tmp_path / "{0..1}.tar"))
    assert data.captions == ["a one", "a two", "b one", "c one", "c two"]
    assert data.text_to_image == [0, 0, 1, 2, 2]
    assert [ref.read() for ref in data.images] == [b"image a", b"image b", b"image c"]
    assert data.source == f"{tmp_path / '0.tar'},{tmp_path / '1.tar'}"
    assert load_retrieval_shards([first]).captions == ["a one", "a two", "b one"]


@pytest.mark.parametrize("sample, problem", [
    ({"__key__": b"k", "txt": b"a caption"}, "has no an image (jpg/jpeg/png/webp)"),
    ({"__key__": b"k", "jpg": b"image"}, "has no a .txt"),
    ({"__key__": b"k", "jpg": b"image", "txt": b"\xff\xfe caption"},
     "has a .txt that is not UTF-8"),
    ({"__key__": b"k", "jpg": b"image", "txt": b" \n\n"}, "has an empty .txt (no captions)"),
])
def test_each_bad_sample_is_named_with_its_shard(tmp_path, sample, problem):
    good = {"__key__": b"good", "jpg": b"image", "txt": b"a caption"}
    path = shard(tmp_path / "0.tar", [good, sample])
    with pytest.raises(UserError) as refused:
        load_retrieval_shards(path)
    assert str(refused.value) == f"{path}: sample 'k' {problem}"


def test_a_shard_without_samples_is_an_empty_set(tmp_path):
    path = shard(tmp_path / "0.tar", [])
    with pytest.raises(UserError) as refused:
        load_retrieval_shards(path)
    assert str(refused.value) == f"{path}: empty retrieval set (0 images, 0 captions)"


def test_a_set_needs_images_and_captions():
    with pytest.raises(UserError, match=r"^here: empty retrieval set \(1 images, 0 captions\)$"):
        RetrievalSet(["image"], [], [], source="here")
    assert RetrievalSet(["image"], ["caption"], [0], source="here").captions == ["caption"]
