"""One loader worker's stream: shard plan, shuffle, replay to a position, decode, batch.

Everything here runs inside a DataLoader worker (or in-process when num_workers=0) and is a pure
function of (spec, logical worker, start position): that is what makes resume exact. See
loader.py for the design.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlp.pipeline.data.errors import BadData
from vlp.pipeline.data.negatives import CaptionEditor
from vlp.pipeline.data.sources import ReadSettings
from vlp.pipeline.data.tar import SkipCounter, iter_samples
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.data.transforms import (
    MaskingSpec,
    decode_caption,
    decode_image,
    image_to_array,
    mask_tokens,
)

log = logging.getLogger(__name__)

# (epoch, block index, raw samples the block's shuffle has emitted). Resampled streams have
# no epochs: epoch stays 0 and the block index counts draws.
Position = tuple[int, int, int]
START: Position = (0, 0, 0)


@dataclass(frozen=True)
class StreamSpec:
    """What a worker needs to rebuild its stream; identical on every resume of a run."""

    sources: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...] | None
    resampled: bool
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank, >= 1
    block_shards: int
    shuffle_buffer: int
    shuffle_buffer_bytes: int
    max_member_bytes: int
    batch_size: int
    image_size: int
    max_text_len: int
    image_keys: tuple[str, ...]
    caption_key: str
    masking: MaskingSpec
    editor: CaptionEditor | None = None  # edited-caption hard negatives (negatives.py)
    reading: ReadSettings = ReadSettings()  # ranged-read size, concurrency and retries

    @property
    def all_urls(self) -> list[str]:
        return [url for source in self.sources for url in source]

    def canonical_urls(self) -> list[str]:
        """All shards in an order that does not depend on where the data lives (so a moved
        shard directory resumes exactly): by source, then file name."""
        keyed = [(i, url.rsplit("/", 1)[-1], url) for i, source in enumerate(self.sources)
                 for url in source]
        return [url for *_, url in sorted(keyed)]


@dataclass(frozen=True)
class Block:
    """Shards whose samples are shuffled together; the buffer drains at the end of a block."""

    epoch: int
    index: int
    urls: tuple[str, ...]


def derive_seed(*parts) -> int:
    """A 64-bit seed from ints and strings, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def worker_shards(spec: StreamSpec, worker: int, epoch: int) -> list[str]:
    """This (rank, worker)'s shards in `epoch`: shuffle all, split by rank, then by worker."""
    order = spec.canonical_urls()
    random.Random(derive_seed(spec.seed, "epoch", epoch)).shuffle(order)
    return order[spec.rank::spec.world_size][worker::spec.num_workers]


def iter_blocks(spec: StreamSpec, worker: int, epoch: int, index: int) -> Iterator[Block]:
    """The endless sequence of blocks from (epoch, index) on."""
    if spec.resampled:
        weights = spec.weights or [1.0] * len(spec.sources)
        for i in itertools.count(index):
            rng = random.Random(derive_seed(spec.seed, "resample", spec.rank, worker, i))
            picks = rng.choices(range(len(spec.sources)), weights=weights, k=spec.block_shards)
            yield Block(0, i, tuple(rng.choice(spec.sources[s]) for s in picks))
        return
    for e in itertools.count(epoch):
        mine = worker_shards(spec, worker, e)
        if not mine:  # build_train_loader refuses this; never spin through empty epochs
            raise RuntimeError(f"loader worker {worker} of rank {spec.rank} has no shards")
        blocks = [mine[i:i + spec.block_shards] for i in range(0, len(mine), spec.block_shards)]
        for i in range(index if e == epoch else 0, len(blocks)):
            yield Block(e, i, tuple(blocks[i]))


def sample_bytes(sample: dict) -> int:
    """The bytes a raw sample holds in memory (its members' data)."""
    return sum(len(value) for value in sample.values() if isinstance(value, bytes))


def shuffled(items: Iterable[dict], buffer_size: int, rng: random.Random,
             max_bytes: int | None = None) -> Iterator[dict]:
    """Bounded-buffer shuffle: fill the buffer, then emit a random slot per new item; drain.

    The buffer also holds at most `max_bytes` of sample data: past it, random slots are emitted
    until it fits again (a shard of large images cannot hold gigabytes in the buffer)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer, held = [], 0
    for item in items:
        held += sample_bytes(item)
        if len(buffer) < buffer_size:
            buffer.append(item)
        else:
            slot = rng.randrange(buffer_size)
            held -= sample_bytes(buffer[slot])
            yield buffer[slot]
            buffer[slot] = item
        while max_bytes is not None and held > max_bytes and len(buffer) > 1:
            slot = rng.randrange(len(buffer))
            buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
            held -= sample_bytes(buffer[-1])
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class UnusableDataGuard:
    """Stops a stream that has read every shard since its last usable sample (all data bad)."""

    def __init__(self, urls: list[str]):
        self.total = len(set(urls))
        self.visited: set[str] = set()

    def visit(self, url: str, skipped: SkipCounter) -> None:
        if len(self.visited) >= self.total and url in self.visited:
            raise RuntimeError(
                f"no usable sample in any of the {self.total} shards: every shard was read since "
                f"the last usable sample. Skipped so far: {skipped.counts}. Check the shards with "
                "`vlp data index` and the image/caption extensions.")
        self.visited.add(url)

    def usable(self) -> None:
        self.visited.clear()


def iter_raw(spec: StreamSpec, worker: int, start: Position, skipped: SkipCounter,
             guard: UnusableDataGuard, stop_epoch: int | None = None
             ) -> Iterator[tuple[Position, dict]]:
    """(position, raw sample) after `start`; replays up to it without decoding or counting."""
    wanted = frozenset(spec.image_keys) | {spec.caption_key}
    epoch, index, replay = start
    skipped.paused = replay > 0

    def read(urls):
        for url in urls:
            guard.visit(url, skipped)
            skipped.add("shard_reads")
            yield from iter_samples(url, wanted, skipped, spec.max_member_bytes, spec.reading)

    for block in iter_blocks(spec, worker, epoch, index):
        if stop_epoch is not None and block.epoch >= stop_epoch:
            return
        rng = random.Random(derive_seed(spec.seed, "shuffle", spec.rank, worker, block.epoch,
                                        block.index))
        emitted = 0
        for sample in shuffled(read(block.urls), spec.shuffle_buffer, rng,
                               spec.shuffle_buffer_bytes):
            emitted += 1
            if emitted <= replay:
                if emitted == replay:  # back at the checkpointed position
                    skipped.paused = False
                    guard.usable()
                continue
            yield (block.epoch, block.index, emitted), sample
        if replay > emitted:
            log.warning("resume position %s is past the end of its block (%d samples): the shards "
                        "changed since the checkpoint; continuing with the next block",
                        start, emitted)
            skipped.paused = False
            guard.usable()
        replay = 0


def decode_sample(sample: dict, spec: StreamSpec) -> tuple[np.ndarray, str]:
    """Raw sample -> (uint8 image (S, S, 3), caption); raises BadData."""
    caption = decode_caption(sample.get(spec.caption_key))
    data = next((sample[k] for k in spec.image_keys if k in sample), None)
    if data is None:
        raise BadData("missing_image", f"no {'/'.join(spec.image_keys)} member")
    return image_to_array(decode_image(data, spec.image_size), spec.image_size), caption


def iter_batches(spec: StreamSpec, tokenizer, worker: int, start: Position,
                 skipped: SkipCounter, stop_epoch: int | None = None) -> Iterator[dict]:
    """Full batches of decoded, tokenized, MLM-masked samples, each tagged with its position."""
    size, batch = spec.image_size, spec.batch_size
    guard = UnusableDataGuard(spec.all_urls)
    pixels = np.empty((batch, size, size, 3), dtype=np.uint8)
    texts: list[str] = []
    keys: list[str] = []
    for position, sample in iter_raw(spec, worker, start, skipped, guard, stop_epoch):
        try:
            image, caption = decode_sample(sample, spec)
        except BadData as exc:
            skipped.add(exc.kind)
            continue
        guard.usable()
        pixels[len(keys)] = image
        texts.append(caption)
        keys.append(sample["__key__"])
        if len(keys) < batch:
            continue
        text_ids, text_mask = tokenize(tokenizer, texts, spec.max_text_len)
        generator = torch.Generator().manual_seed(
            derive_seed(spec.seed, "mlm", spec.rank, worker, *position))
        mlm_ids, mlm_labels = mask_tokens(text_ids, text_mask, spec.masking, generator)
        yield {
            "images": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),  # new, uint8
            "text_ids": text_ids, "text_mask": text_mask,
            "mlm_ids": mlm_ids, "mlm_labels": mlm_labels,
            **_negatives(spec, tokenizer, texts, derive_seed(spec.seed, "negatives", spec.rank,
                                                             worker, *position)),
            "keys": keys,
            "worker": worker, "position": list(position), "skipped": dict(skipped.counts),
        }
        texts, keys = [], []


def _negatives(spec: StreamSpec, tokenizer, texts: list[str], seed: int) -> dict:
    """An edited caption per sample (neg_ids, neg_mask (B, L)) and whether it has one
    (has_neg (B,)); a caption with nothing to edit stands in for itself, masked out. Empty
    without an editor."""
    if spec.editor is None:
        return {}
    rng = random.Random(seed)
    edited = [spec.editor.edit(text, rng) for text in texts]
    neg_ids, neg_mask = tokenize(tokenizer, [e or t for e, t in zip(edited, texts)],
                                 spec.max_text_len)
    return {"neg_ids": neg_ids, "neg_mask": neg_mask,
            "has_neg": torch.tensor([e is not None for e in edited])}


class ShardStream(IterableDataset):
    """The DataLoader's dataset: each worker process runs its logical worker's `iter_batches`.

    `positions` (logical worker -> position of its last consumed batch) and `batches_consumed`
    are set by TrainLoader before each (re)start; worker p plays logical worker
    (p + batches_consumed) % num_workers because DataLoader hands out batches round-robin from
    worker 0.
    """

    def __init__(self, spec: StreamSpec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self.positions: dict[int, Position] = {}
        self.batches_consumed = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, count = (0, 1) if info is None else (info.id, info.num_workers)
        if count != self.spec.num_workers:
            raise RuntimeError(f"stream built for {self.spec.num_workers} workers runs in {count}")
        if info is not None:
            torch.set_num_threads(1)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        worker = (physical + self.batches_consumed) % count
        start = tuple(self.positions.get(worker, START))
        return iter_batches(self.spec, self.tokenizer, worker, start, SkipCounter())
