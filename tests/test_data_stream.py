"""One loader worker's stream on hand-written shards (one solid colour per sample, its index in the
caption): how shards split across ranks and workers, blocks and resampling, the bounded shuffle,
exact replay to a position, what is skipped and counted, and the batches with their positions,
masks and edited negatives. The loader with DataLoader workers, ranks and resume is in
tests/test_loader.py."""
from __future__ import annotations

import io
import logging
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data_prep.tokenizer import train_tokenizer
from vlp.pipeline.data.errors import BadData
from vlp.pipeline.data import stream as stream_module
from vlp.pipeline.data.negatives import CaptionEditor, Lexicon
from vlp.pipeline.data.stream import (
    START,
    Block,
    ShardStream,
    StreamSpec,
    UnusableDataGuard,
    decode_sample,
    derive_seed,
    iter_batches,
    iter_blocks,
    iter_raw,
    sample_bytes,
    shuffled,
    worker_shards,
)
from vlp.pipeline.data.sources import ReadSettings
from vlp.pipeline.data.tar import SkipCounter, iter_samples
from vlp.pipeline.data.tokenizer import load_tokenizer, tokenize
from vlp.pipeline.data.transforms import MaskingSpec, mask_tokens

COLOURS = ["red", "green", "blue", "grey"]
RGB = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200), "grey": (90, 90, 90)}


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), RGB[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """4 shards of 3 samples: sample n is colour n % 4 with caption "a <colour> square n" (and a
    json member the stream does not ask for)."""
    root = tmp_path_factory.mktemp("shards")
    urls = []
    for s in range(4):
        samples = []
        for n in range(3 * s, 3 * s + 3):
            colour = COLOURS[n % 4]
            samples.append((f"{n:04d}", {"png": png(colour), "json": b"{}",
                                         "txt": f"a {colour} square {n}".encode()}))
        urls.append(write_shard(root / f"{s:05d}.tar", samples))
    return urls


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"a {c} square {n}" for c in COLOURS for n in range(12)] * 5 + ["a big circle"] * 5
    return load_tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=60))


def spec_for(urls, tokenizer=None, **settings) -> StreamSpec:
    masking = MaskingSpec(mask_token_id=tokenizer.mask_token_id if tokenizer else 1,
                          vocab_size=len(tokenizer) if tokenizer else 10,
                          special_ids=tuple(tokenizer.all_special_ids) if tokenizer else (0,))
    fields = dict(sources=(tuple(urls),), weights=None, resampled=False, seed=3, rank=0,
                  world_size=1, num_workers=1, block_shards=2, shuffle_buffer=1,
                  shuffle_buffer_bytes=1 << 30, max_member_bytes=1 << 20, batch_size=2,
                  image_size=8, max_text_len=8, image_keys=("png", "jpg"), caption_key="txt",
                  masking=masking)
    return StreamSpec(**{**fields, **settings})


def keys(stream) -> list[str]:
    return [sample["__key__"] for _, sample in stream]


# ------------------------------------------------------------------------------ shard planning

def test_seeds_are_stable_64_bit_and_differ_by_every_part():
    assert derive_seed(1, "epoch", 0) == derive_seed(1, "epoch", 0)
    seeds = {derive_seed(*parts) for parts in ((1, "epoch", 0), (2, "epoch", 0), (1, "e", 0),
                                               (1, "epoch", 1), (1, "epoch"))}
    assert len(seeds) == 5 and all(0 <= s < 1 << 64 for s in seeds)
    assert max(seeds) > 1 << 32  # all 64 bits used
    # fixed for good: a checkpoint of an earlier version resumes on the order it was trained on
    assert derive_seed(0, "epoch", 0) == 15035464410072637492
    assert derive_seed(7, "mlm", 1, 2, 0, 3, 4) == 11533219747226532661


def test_canonical_order_is_by_source_then_file_name_wherever_the_files_lie():
    spec = spec_for([], sources=(("/x/b.tar", "/y/a.tar"), ("/a/z.tar", "/b/c.tar")))
    assert spec.canonical_urls() == ["/y/a.tar", "/x/b.tar", "/b/c.tar", "/a/z.tar"]
    assert spec.all_urls == ["/x/b.tar", "/y/a.tar", "/a/z.tar", "/b/c.tar"]
    assert spec_for([], sources=(("b.tar", "a.tar"),)).canonical_urls() == ["a.tar", "b.tar"]


def test_each_epoch_shuffles_every_shard_then_splits_by_rank_then_worker():
    urls = [f"/s/{i:02d}.tar" for i in range(10)]
    for epoch in (0, 1):
        order = sorted(urls)
        random.Random(derive_seed(7, "epoch", epoch)).shuffle(order)
        parts = {}
        for rank in (0, 1):
            for worker in (0, 1, 2):
                spec = spec_for(urls, seed=7, rank=rank, world_size=2, num_workers=3)
                parts[rank, worker] = worker_shards(spec, worker, epoch)
                assert parts[rank, worker] == order[rank::2][worker::3]
        assert sorted(u for part in parts.values() for u in part) == sorted(urls)
    assert worker_shards(spec_for(urls, seed=7), 0, 0) != worker_shards(spec_for(urls, seed=7),
                                                                         0, 1)


def test_blocks_cut_a_worker_s_shards_and_go_on_epoch_after_epoch():
    urls = [f"/s/{i}.tar" for i in range(5)]
    spec = spec_for(urls, block_shards=2)
    blocks = iter_blocks(spec, 0, 0, 1)
    first = [next(blocks) for _ in range(5)]
    epoch0, epoch1 = worker_shards(spec, 0, 0), worker_shards(spec, 0, 1)
    assert first == [Block(0, 1, tuple(epoch0[2:4])), Block(0, 2, tuple(epoch0[4:])),
                     Block(1, 0, tuple(epoch1[:2])), Block(1, 1, tuple(epoch1[2:4])),
                     Block(1, 2, tuple(epoch1[4:]))]
    later = iter_blocks(spec, 0, 3, 2)
    assert next(later) == Block(3, 2, tuple(worker_shards(spec, 0, 3)[4:]))


def test_a_worker_without_shards_is_an_error_not_an_endless_loop():
    spec = spec_for(["/s/0.tar"], world_size=2, rank=1)
    with pytest.raises(RuntimeError) as error:
        next(iter_blocks(spec, 0, 0, 0))
    assert str(error.value) == "loader worker 0 of rank 1 has no shards"


def test_resampled_blocks_draw_sources_by_weight_with_replacement():
    sources = (("/a/0.tar", "/a/1.tar"), ("/b/0.tar",), ("/c/0.tar",))
    spec = spec_for([], sources=sources, weights=(1.0, 3.0, 0.0), resampled=True, block_shards=4)
    blocks = iter_blocks(spec, 1, 0, 5)
    drawn = [next(blocks) for _ in range(200)]
    assert [(b.epoch, b.index) for b in drawn[:3]] == [(0, 5), (0, 6), (0, 7)]
    assert all(len(b.urls) == 4 for b in drawn)
    counts = {prefix: sum(u.startswith(prefix) for b in drawn for u in b.urls)
              for prefix in ("/a", "/b", "/c")}
    assert counts["/c"] == 0 and 0.7 < counts["/b"] / 800 < 0.8  # 3 of 4
    for i, block in enumerate(drawn[:20], start=5):
        rng = random.Random(derive_seed(spec.seed, "resample", 0, 1, i))
        picks = rng.choices(range(3), weights=(1.0, 3.0, 0.0), k=4)
        assert block.urls == tuple(rng.choice(sources[s]) for s in picks)
    assert next(iter_blocks(spec, 1, 0, 6)) == drawn[1]  # a pure function of the index
    assert next(iter_blocks(spec, 2, 0, 6)) != drawn[1]  # and of the worker
    even = spec_for([], sources=sources, resampled=True, block_shards=4)
    urls = [u for b in (next(iter_blocks(even, 0, 0, i)) for i in range(200)) for u in b.urls]
    assert 0.25 < sum(u.startswith("/c") for u in urls) / len(urls) < 0.42  # no weights: 1/3


# -------------------------------------------------------------------------------- the shuffle

def test_the_shuffle_emits_every_item_once_and_never_further_ahead_than_the_buffer():
    items = [{"__key__": str(i), "x": b"1"} for i in range(50)]
    out = list(shuffled(iter(items), 5, random.Random(0)))
    assert sorted(int(s["__key__"]) for s in out) == list(range(50))
    assert out != items
    for position, sample in enumerate(out[:-5]):
        assert int(sample["__key__"]) <= position + 5  # within the 5-slot buffer's reach
    assert list(shuffled(iter(items), 1, random.Random(0))) == items
    assert list(shuffled(iter(items), 2, random.Random(0))) != items  # two slots shuffle
    assert list(shuffled(iter(items), 0, random.Random(0))) == items


def test_the_shuffle_buffer_holds_no_more_bytes_than_allowed():
    items = [{"__key__": str(i), "jpg": bytes(100), "txt": b"caption"} for i in range(20)]
    assert sample_bytes(items[0]) == 107
    unbounded = [int(x["__key__"]) for x in shuffled(iter(items), 10, random.Random(0))]
    assert any(key > position + 2 for position, key in enumerate(unbounded))
    for room in (1, 2):  # samples' worth of bytes: one more waits before the excess goes out
        out = [int(x["__key__"]) for x in shuffled(iter(items), 10, random.Random(0),
                                                    max_bytes=107 * room)]
        assert sorted(out) == list(range(20))
        assert all(key <= position + room for position, key in enumerate(out)), (room, out)


# ------------------------------------------------------------------------ all data unusable

def test_the_guard_stops_a_stream_that_read_every_shard_without_a_usable_sample():
    guard, skipped = UnusableDataGuard(["a", "b", "a"]), SkipCounter()
    skipped.add("corrupt_tar")
    guard.visit("a", skipped)
    guard.visit("b", skipped)
    with pytest.raises(RuntimeError) as error:
        guard.visit("a", skipped)
    assert str(error.value) == (
        "no usable sample in any of the 2 shards: every shard was read since the last usable "
        "sample. Skipped so far: {'corrupt_tar': 1}. Check the shards with `vlp data index` and "
        "the image/caption extensions.")
    guard.usable()
    guard.visit("a", skipped)
    guard.visit("b", skipped)
    partial = UnusableDataGuard(["a", "b"])
    partial.visit("a", skipped)
    partial.visit("a", skipped)  # b not read yet: no verdict


# ------------------------------------------------------------------------ positions and replay

def test_positions_count_samples_emitted_per_block_and_replay_resumes_exactly(shards):
    spec = spec_for(shards, shuffle_buffer=4)
    run = iter_raw(spec, 0, START, SkipCounter(), UnusableDataGuard(shards), stop_epoch=1)
    whole = [(position, sample["__key__"]) for position, sample in run]
    assert len(whole) == 12 and [p for p, _ in whole[:7]] == [
        (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 0, 6), (0, 1, 1)]
    assert sorted(k for _, k in whole) == [f"{n:04d}" for n in range(12)]
    first = next(iter_raw(spec, 0, START, SkipCounter(), UnusableDataGuard(shards)))[1]
    assert sorted(first) == ["__key__", "png", "txt"]  # only what the spec reads
    for cut in (3, 6, 7, 11):
        skipped = SkipCounter()
        resumed = iter_raw(spec, 0, whole[cut - 1][0], skipped, UnusableDataGuard(shards),
                           stop_epoch=1)
        assert [(p, s["__key__"]) for p, s in resumed] == whole[cut:]
    for cut in (1, 4):
        skipped = SkipCounter()
        list(iter_raw(spec, 0, whole[cut - 1][0], skipped, UnusableDataGuard(shards),
                      stop_epoch=1))
        assert skipped.counts == {"shard_reads": 2}  # the block replayed is not counted again


def test_a_position_past_its_block_s_end_warns_and_goes_on_with_the_next(shards, caplog):
    spec = spec_for(shards)
    with caplog.at_level(logging.WARNING, logger="vlp.pipeline.data.stream"):
        skipped = SkipCounter()
        got = list(iter_raw(spec, 0, (0, 0, 9), skipped, UnusableDataGuard(shards),
                            stop_epoch=1))
        at_end = list(iter_raw(spec, 0, (0, 0, 6), SkipCounter(), UnusableDataGuard(shards),
                               stop_epoch=1))  # the block's last sample: no warning
    assert [p for p, _ in at_end] == [(0, 1, n) for n in range(1, 7)]
    assert [p for p, _ in got] == [(0, 1, n) for n in range(1, 7)]
    assert skipped.counts == {"shard_reads": 2}  # counting again from the next block
    assert [r.getMessage() for r in caplog.records] == [
        "resume position (0, 0, 9) is past the end of its block (6 samples): the shards changed "
        "since the checkpoint; continuing with the next block"]


# ------------------------------------------------------------------------ decoding and batches

def test_the_byte_budget_of_the_shuffle_buffer_reaches_the_stream(shards):
    spec = spec_for(shards, shuffle_buffer=6, shuffle_buffer_bytes=1)  # room for no sample
    for position, sample in iter_raw(spec, 0, START, SkipCounter(), UnusableDataGuard(shards),
                                     stop_epoch=1):
        block = worker_shards(spec, 0, 0)[2 * position[1]:2 * position[1] + 2]
        in_file_order = [f"{n:04d}" for url in block for n in range(3 * int(Path(url).stem),
                                                                    3 * int(Path(url).stem) + 3)]
        assert in_file_order.index(sample["__key__"]) <= position[2]  # one sample held at most


def test_a_sample_decodes_to_its_first_image_key_and_its_caption(shards):
    spec = spec_for(shards, image_keys=("jpg", "png"))
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), RGB["green"]).save(jpeg, format="JPEG", quality=95)
    image, _ = decode_sample({"jpg": jpeg.getvalue(), "txt": b"x"}, spec)
    assert image.shape == (8, 8, 3) and abs(int(image[4, 4, 1]) - 200) < 8
    image, caption = decode_sample({"png": png("blue"), "txt": b" a blue square \n"}, spec)
    assert caption == "a blue square" and image.shape == (8, 8, 3)
    assert (image == np.array(RGB["blue"], dtype=np.uint8)).all()
    both = {"jpg": png("red"), "png": png("blue"), "txt": b"x"}
    assert (decode_sample(both, spec)[0] == np.array(RGB["red"], dtype=np.uint8)).all()
    with pytest.raises(BadData) as error:
        decode_sample({"webp": png("red"), "txt": b"x"}, spec)
    assert (error.value.kind, str(error.value)) == ("missing_image", "no jpg/png member")


def test_batches_hold_the_decoded_samples_with_their_positions_and_counts(shards, tokenizer,
                                                                          tmp_path):
    bad = write_shard(tmp_path / "bad.tar", [
        ("b0", {"png": b"not an image", "txt": b"x"}), ("b1", {"png": png("red")}),
        ("b2", {"png": png("grey"), "txt": b"a grey square 9"})])
    urls = shards[:1] + [bad]
    spec = spec_for(urls, tokenizer, batch_size=2, block_shards=2)
    skipped = SkipCounter()
    batches = iter_batches(spec, tokenizer, 0, START, skipped, stop_epoch=1)
    first, second = next(batches), next(batches)
    assert next(batches, None) is None
    order = worker_shards(spec, 0, 0)
    expected = (["0000", "0001", "0002", "b2"] if order[0] == shards[0]
                else ["b2", "0000", "0001", "0002"])
    assert first["keys"] + second["keys"] == expected
    assert first["images"].dtype == torch.uint8 and first["images"].shape == (2, 3, 8, 8)
    colour = {"0000": "red", "0001": "green", "0002": "blue", "b2": "grey"}
    for batch in (first, second):
        for image, key in zip(batch["images"], batch["keys"]):
            assert image[:, 0, 0].tolist() == list(RGB[colour[key]])
        captions = [f"a {colour[k]} square {int(k) if k[0] != 'b' else 9}" for k in batch["keys"]]
        ids, mask = tokenize(tokenizer, captions, 8)
        assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_mask"], mask)
        assert batch["worker"] == 0 and batch["mlm_ids"].shape == ids.shape
        assert "neg_ids" not in batch
    assert second["skipped"] == {"shard_reads": 2, "bad_image": 1,
                                 "missing_caption": 1}
    assert second["position"][:2] == [0, 0] and first["position"][2] < second["position"][2]


def test_the_masking_and_negatives_are_seeded_by_the_batch_s_position(shards, tokenizer):
    lexicon = Lexicon({"colour": (("red",), ("green",), ("blue",), ("grey",))})
    spec = spec_for(shards, tokenizer, editor=CaptionEditor(lexicon), batch_size=3,
                    masking=MaskingSpec(tokenizer.mask_token_id, len(tokenizer),
                                        tuple(tokenizer.all_special_ids), probability=0.5))
    run = list(iter_batches(spec, tokenizer, 0, START, SkipCounter(), stop_epoch=1))
    again = list(iter_batches(spec, tokenizer, 0, tuple(run[1]["position"]), SkipCounter(),
                              stop_epoch=1))
    for a, b in zip(run[2:], again):
        for name in ("mlm_ids", "mlm_labels", "neg_ids", "neg_mask", "has_neg"):
            assert torch.equal(a[name], b[name]), name
    assert not torch.equal(run[0]["mlm_ids"], run[1]["mlm_ids"])
    assert (run[0]["mlm_labels"] != -100).any()
    for batch in run:
        assert batch["has_neg"].all()  # every caption names a colour
        captions = tokenizer.batch_decode(batch["neg_ids"], skip_special_tokens=True)
        originals = tokenizer.batch_decode(batch["text_ids"], skip_special_tokens=True)
        for edited, original in zip(captions, originals):
            assert edited != original and edited.split()[2:] == original.split()[2:]
    other = spec_for(shards, tokenizer, editor=CaptionEditor(lexicon), batch_size=3, seed=4)
    first_other = next(iter_batches(other, tokenizer, 0, START, SkipCounter(), stop_epoch=1))
    assert not torch.equal(first_other["neg_ids"], run[0]["neg_ids"]) or not torch.equal(
        first_other["text_ids"], run[0]["text_ids"])


def test_a_caption_without_an_edit_stands_in_for_itself_masked_out(tmp_path, tokenizer):
    url = write_shard(tmp_path / "s.tar", [("0", {"png": png("red"), "txt": b"a big circle"}),
                                           ("1", {"png": png("red"), "txt": b"a red square 1"})])
    lexicon = Lexicon({"colour": (("red",), ("green",))})
    spec = spec_for([url], tokenizer, editor=CaptionEditor(lexicon), batch_size=2)
    batch = next(iter_batches(spec, tokenizer, 0, START, SkipCounter(), stop_epoch=1))
    assert batch["has_neg"].tolist() == [False, True]
    assert torch.equal(batch["neg_ids"][0], batch["text_ids"][0])
    assert tokenizer.decode(batch["neg_ids"][1], skip_special_tokens=True) == "a green square 1"


def test_the_dataset_runs_the_logical_worker_of_its_turn(shards, tokenizer):
    spec = spec_for(shards, tokenizer, batch_size=2)
    stream = ShardStream(spec, tokenizer)
    first = next(iter(stream))
    stream.positions = {0: tuple(first["position"])}
    stream.batches_consumed = 1
    second = next(iter(stream))
    assert second["position"][2] == first["position"][2] + 2
    two = ShardStream(spec_for(shards, tokenizer, num_workers=2), tokenizer)
    with pytest.raises(RuntimeError, match="^stream built for 2 workers runs in 1$"):
        next(iter(two))


class WorkerInfo:
    """What torch.utils.data.get_worker_info() gives inside a DataLoader worker."""

    def __init__(self, id: int, num_workers: int):
        self.id, self.num_workers = id, num_workers


def test_inside_a_worker_process_the_stream_plays_its_turn_on_one_thread(shards, tokenizer,
                                                                         monkeypatch):
    threads = []
    monkeypatch.setattr(stream_module.torch, "set_num_threads", threads.append)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    next(iter(ShardStream(spec_for(shards, tokenizer), tokenizer)))  # in this process
    assert threads == [] and "TOKENIZERS_PARALLELISM" not in os.environ
    spec = spec_for(shards, tokenizer, num_workers=3, batch_size=1)
    dataset = ShardStream(spec, tokenizer)
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: WorkerInfo(0, 3))
    assert next(iter(dataset))["worker"] == 0  # nothing consumed yet: worker p plays p
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: WorkerInfo(1, 3))
    dataset.batches_consumed = 1  # the next batch comes from process 0, so process 1 plays 2
    later = (0, 0, 1)
    dataset.positions = {2: later}
    batch = next(iter(dataset))
    assert batch["worker"] == 2 and batch["position"] == [0, 0, 2]
    assert threads == [1, 1] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's setting stays
    next(iter(dataset))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: WorkerInfo(0, 2))
    with pytest.raises(RuntimeError, match="^stream built for 3 workers runs in 2$"):
        next(iter(dataset))


def test_each_worker_reads_its_own_shards_and_damage_is_counted(shards, tokenizer, tmp_path):
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shards[0]).read_bytes()[:2000])  # breaks inside the first sample
    urls = shards + [str(cut)]
    spec = spec_for(urls, tokenizer, num_workers=2, batch_size=1, block_shards=1)
    got = {}
    for worker in (0, 1):
        skipped = SkipCounter()
        batches = list(iter_batches(spec, tokenizer, worker, START, skipped, stop_epoch=1))
        got[worker] = [b["keys"][0] for b in batches]
        assert {b["worker"] for b in batches} == {worker}
        expected = [key for url in worker_shards(spec, worker, 0)
                    for key in ([] if url == str(cut) else
                                [f"{n:04d}" for n in range(3 * int(Path(url).stem),
                                                           3 * int(Path(url).stem) + 3)])]
        assert got[worker] == expected
        if str(cut) in worker_shards(spec, worker, 0):
            assert (skipped.counts["corrupt_tar"], skipped.counts["cut_by_damage"]) == (1, 1)
    assert not set(got[0]) & set(got[1]) and len(got[0] + got[1]) == 12


def test_reads_pass_the_spec_s_limits_and_settings(shards, monkeypatch):
    calls = []
    read = stream_module.iter_samples

    def spy(url, wanted, skipped, max_member_bytes, reading):
        calls.append((url, wanted, isinstance(skipped, SkipCounter), max_member_bytes, reading))
        return read(url, wanted, skipped, max_member_bytes, reading)

    monkeypatch.setattr(stream_module, "iter_samples", spy)
    settings = ReadSettings(buffer_bytes=4096, concurrency=2, retries=1)
    spec = spec_for(shards, max_member_bytes=5000, reading=settings)
    next(iter_raw(spec, 0, START, SkipCounter(), UnusableDataGuard(shards)))
    assert calls[0][1:] == (frozenset({"png", "jpg", "txt"}), True, 5000, settings)


def test_a_stream_whose_every_sample_is_bad_stops_with_the_counts(tmp_path, tokenizer):
    urls = [write_shard(tmp_path / f"{i}.tar", [(f"{i}", {"png": b"broken", "txt": b"x"})])
            for i in range(2)]
    spec = spec_for(urls, tokenizer, batch_size=1)
    with pytest.raises(RuntimeError) as error:
        next(iter_batches(spec, tokenizer, 0, START, SkipCounter(), stop_epoch=5))
    assert str(error.value).startswith(
        "no usable sample in any of the 2 shards: every shard was read since the last usable "
        "sample. Skipped so far: {'shard_reads': 2, 'bad_image': 2}.")


def test_random_draws_are_seeded_by_seed_stream_rank_worker_and_position(shards, tokenizer):
    """The shuffle, the masking and the edited negatives each have their own seed, from the
    run's seed, the stream's name, the rank, the worker and the block or batch position: what
    makes a resumed run draw what the uninterrupted one drew, and ranks and workers differ."""
    lexicon = Lexicon({"colour": (("red",), ("green",), ("blue",), ("grey",))})
    masking = MaskingSpec(tokenizer.mask_token_id, len(tokenizer),
                          tuple(tokenizer.all_special_ids), probability=0.5)
    spec = spec_for(shards, tokenizer, editor=CaptionEditor(lexicon), batch_size=2, rank=1,
                    world_size=2, seed=11, shuffle_buffer=3, masking=masking)
    batches = iter_batches(spec, tokenizer, 0, START, SkipCounter())
    block = next(iter_blocks(spec, 0, 0, 0))
    raw = [sample for url in block.urls
           for sample in iter_samples(url, frozenset({"png", "jpg", "txt"}), SkipCounter())]
    order = shuffled(iter(raw), 3, random.Random(derive_seed(11, "shuffle", 1, 0, 0, 0)))
    keys = [s["__key__"] for s in order]
    for n in range(len(keys) // 2):
        batch = next(batches)
        assert batch["keys"] == keys[2 * n:2 * n + 2]
        position = tuple(batch["position"])
        generator = torch.Generator().manual_seed(derive_seed(11, "mlm", 1, 0, *position))
        ids, labels = mask_tokens(batch["text_ids"], batch["text_mask"], masking, generator)
        assert torch.equal(batch["mlm_ids"], ids) and torch.equal(batch["mlm_labels"], labels)
        rng = random.Random(derive_seed(11, "negatives", 1, 0, *position))
        texts = tokenizer.batch_decode(batch["text_ids"], skip_special_tokens=True)
        edited = [spec.editor.edit(text, rng) for text in texts]
        assert tokenizer.batch_decode(batch["neg_ids"], skip_special_tokens=True) == edited


@pytest.mark.parametrize("sizes, slots", [
    (random.Random(5).choices(list(range(10, 300)) + [700] * 30, k=80), 4),
    ([100] * 40, 8),  # five samples are exactly the budget: they may stay
])
def test_the_buffer_holds_as_much_as_its_slots_and_bytes_allow_and_no_more(sizes, slots):
    """Samples of random sizes (some larger than the budget) through a 4-slot, 500-byte buffer,
    traced step by step: after each new sample the buffer is within both limits but never empty
    (one sample may exceed the bytes alone),
    it emitted one sample to make room in the slots, and past that only as many as the bytes
    required (the last one emitted would not have fitted)."""
    items = [{"__key__": str(i), "jpg": bytes(n)} for i, n in enumerate(sizes)]
    for seed in range(3):
        pulled, done = [], []

        def source():
            for item in items:
                pulled.append(item)
                yield item
            done.append(True)

        steps: dict[int, list[dict]] = {}
        for sample in shuffled(source(), slots, random.Random(seed), max_bytes=500):
            if not done:
                steps.setdefault(len(pulled), []).append(sample)
        emitted, held = set(), []
        for step in range(1, len(items) + 1):
            full_before = len(held) == slots
            out = steps.get(step, [])
            emitted |= {s["__key__"] for s in out}
            held = [s for s in pulled[:step] if s["__key__"] not in emitted]
            in_bytes = sum(sample_bytes(s) for s in held)
            assert 1 <= len(held) <= slots and (in_bytes <= 500 or len(held) == 1), step
            assert not full_before or out, step  # a full buffer makes room
            extra = out[1:] if full_before else out
            if extra:
                assert in_bytes + sample_bytes(extra[-1]) > 500, step
