"""Batched encoding for evaluation on a stub model whose embeddings are known (an image's mean
colour, a caption's token ids): order, batching, skipped images as NaN rows, bf16 autocast, the
model's device, and the split across two gloo ranks (this process and a forked child) against
one process."""
from __future__ import annotations

import contextlib
import datetime
import os
import re

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from vlp.data_prep.tokenizer import train_tokenizer
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.data.tokenizer import load_tokenizer, tokenize
from vlp.pipeline.distributed import free_port
from vlp.pipeline.eval import encode
from vlp.pipeline.eval.encode import (
    autocast,
    distributed_map,
    encode_images,
    encode_texts,
    model_device,
)
from vlp.pipeline.eval.images import ImageRef

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90), (250, 250, 0)]


class ColourModel(torch.nn.Module):
    """encode_image: an image's mean colour; encode_text: the first four token ids. Both record
    the batches and whether bf16 autocast was on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("image", len(pixels), torch.is_autocast_enabled("cpu")))
        return pixels.float().mean(dim=(2, 3)).to(torch.bfloat16 if self.calls[-1][2]
                                                  else torch.float32)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(("text", len(ids), torch.is_autocast_enabled("cpu")))
        return (ids[:, :4] * mask[:, :4]).double()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[ImageRef]:
    root = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (40, 24), colour).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"not an image")
    return [ImageRef(str(root / f"{i}.png")) for i in range(len(COLOURS))]


def test_the_device_is_the_parameters_or_the_backend_s():
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")

    class Backend:
        device = torch.device("cpu")

    assert model_device(Backend()) == torch.device("cpu")


def test_bf16_autocast_only_when_asked_and_fast(monkeypatch):
    cpu = torch.device("cpu")
    with autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(encode, "fast_bf16", lambda device: device == cpu)
    with autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(encode, "fast_bf16", lambda device: False)
    assert isinstance(autocast(cpu, True), contextlib.nullcontext)


def test_one_process_encodes_every_item_in_batches_in_order(capfd):
    batches = []

    def encode_batch(batch: range) -> torch.Tensor:
        batches.append(batch)
        return torch.tensor([[float(i)] for i in batch])

    assert distributed_map(7, 3, encode_batch, "things", "thing").tolist() == [
        [float(i)] for i in range(7)]
    assert batches == [range(0, 3), range(3, 6), range(6, 7)]
    err = capfd.readouterr().err
    assert "things: 3/7 (42%)" in err and "things: 7/7 (100%)" in err
    assert re.search(r"things: 7/7 \(100%\) \| [\d.]+ things/s", err)
    assert distributed_map(0, 3, encode_batch).shape == (0,)
    distributed_map(2, 2, encode_batch)  # the default label and unit
    assert re.search(r"encode: 2/2 \(100%\) \| [\d.]+ items/s", capfd.readouterr().err)


def _rank_slices(rank: int, port: int, num_items: int, world: int = 2):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    seen = []

    def encode_batch(batch: range) -> torch.Tensor:
        seen.extend(batch)
        return torch.tensor([[float(i), float(rank)] for i in batch])

    try:
        return seen, distributed_map(num_items, 2, encode_batch).tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_items, slices", [(7, ([0, 1, 2, 3], [4, 5, 6])), (1, ([0], []))])
def test_two_ranks_encode_contiguous_slices_and_both_get_everything_in_order(num_items, slices):
    port = free_port()
    child = os.fork()
    if child == 0:  # rank 1: exit status 0 when it saw its slice and the whole result
        code = 1
        try:
            seen, out = _rank_slices(1, port, num_items)
            code = 0 if seen == slices[1] and len(out) == num_items else 1
        finally:
            os._exit(code)
    seen, out = _rank_slices(0, port, num_items)
    _, status = os.waitpid(child, 0)
    assert seen == slices[0] and os.waitstatus_to_exitcode(status) == 0
    assert out == [[float(i), float(i in slices[1])] for i in range(num_items)]


def test_images_embed_in_order_in_float32_on_the_host(images):
    model = ColourModel()
    emb = encode_images(model, images, 16, batch_size=2, workers=1)
    assert emb.dtype == torch.float32 and emb.device == torch.device("cpu")
    assert emb.tolist() == [list(map(float, c)) for c in COLOURS]
    assert [call[:2] for call in model.calls] == [("image", 2), ("image", 2), ("image", 1)]


def test_bf16_reaches_the_image_and_text_encoders(images, monkeypatch, tokenizer):
    monkeypatch.setattr(encode, "fast_bf16", lambda device: True)
    model = ColourModel()
    encode_images(model, images[:1], 16, bf16=True)
    encode_texts(model, tokenizer, ["a red circle"], 8, bf16=True)
    encode_images(model, images[:1], 16)
    assert [call[2] for call in model.calls] == [True, True, False]


def test_an_image_that_does_not_decode_is_an_error_or_a_counted_nan_row(images):
    bad = ImageRef(images[0].path.replace("0.png", "bad.png"))
    with pytest.raises(UserError, match="bad.png"):
        encode_images(ColourModel(), [images[0], bad], 16)
    skipped = SkipCounter()
    emb = encode_images(ColourModel(), [images[0], bad, images[1], bad], 16, batch_size=3,
                        skipped=skipped)
    assert emb[0].tolist() == [200.0, 10.0, 10.0] and emb[2].tolist() == [10.0, 200.0, 10.0]
    assert emb[[1, 3]].isnan().all() and emb.dtype == torch.float32
    assert sum(skipped.counts.values()) == 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["a red circle", "two blue squares on the left", "a green cross"] * 30
    return load_tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=40))


def test_texts_embed_in_order_tokenized_to_the_length_given(tokenizer):
    texts = ["a red circle", "two blue squares on the left", "a green cross"]
    model = ColourModel()
    emb = encode_texts(model, tokenizer, texts, 3, batch_size=2)
    ids, mask = tokenize(tokenizer, texts, 3)  # [CLS] word [SEP]: cut to the length given
    assert ids.shape == (3, 3) and emb.dtype == torch.float32
    assert emb.tolist() == (ids * mask).float().tolist()
    assert [call[:2] for call in model.calls] == [("text", 2), ("text", 1)]
