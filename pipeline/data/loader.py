"""The training data loader: webdataset shards -> batches, with a position that resumes exactly.

    loader = build_train_loader(DataConfig(shards="shards/{00000..00099}.tar"), tokenizer,
                                batch_size=64, seed=0, image_size=224, max_text_len=40,
                                rank=rank, world_size=world_size)
    for step, batch in zip(range(max_steps), loader):   # endless: epochs roll over inside
        ...
    checkpoint["loader"] = loader.state_dict()          # per rank, JSON-serialisable
    loader.load_state_dict(checkpoint["loader"])         # before iterating again

Stream (stream.py). Each rank runs `num_workers` logical workers (one in-process
when num_workers=0), each an endless stream of epochs. In epoch e every worker orders the shard
list (by source, then file name: moving the data does not change the stream), shuffles it with
Random(seed, e), takes shards[rank::world][worker::num_workers] and cuts that into blocks of
`block_shards` shards. Each stream advances through its epochs at its own pace (streams hold
different sample counts), so a stream never waits and never repeats a sample within an epoch.
A block's raw samples (undecoded bytes grouped by key) pass a bounded shuffle buffer seeded from (seed, e, rank, worker, block) that drains at the
block's end; then they are decoded (bad ones skipped and counted), and batched, tokenized and
MLM-masked inside the worker, so a DataLoader item is a whole batch. Resampled mode draws each
block's shards with replacement (source by weight, then a shard of it uniformly) from an RNG
seeded by (seed, rank, worker, block); it has no epochs. MLM masks are drawn from an RNG seeded
by the batch's position, so they too are the same after a resume.

Position. Every batch carries `worker` (logical id), `position` = [epoch, block, raw samples the
block's shuffle had emitted when the batch filled] and `skipped` (that worker's cumulative skip
counts). TrainLoader keeps, per logical worker, the position of its last *consumed* batch, plus
the number of batches consumed: that is `state_dict()`. On resume each worker regenerates its
block from the seeds, re-reads its tar bytes through the same shuffle and drops the first N
emitted samples without decoding or counting them: exact, and costs at most one block of
reading (why blocks exist: a plain wds shuffle would need the whole epoch replayed). DataLoader
hands out batches round-robin from physical worker 0, so after k consumed batches physical
worker p plays logical worker (p + k) % num_workers; the global batch order is then identical.

Skip counts: `skipped_counts()` is cumulative for the run on this rank (restored from the
checkpoint), summed over workers, with every kind in errors.SKIP_KINDS present; `counts()` adds
the shard reads and retried requests (errors.READ_COUNTS) the same way.

Shards are webdataset tars (img2dataset / OpenCLIP layouts) read by tar.py, not by webdataset's
stages: a position needs the shuffle's emitted count, and damage must be seen (tarfile, under
webdataset, takes a truncated tar for a complete one). URL handling, including brace expansion,
is in sources.py.

Security: `pipe:` URLs are refused, only jpg/jpeg/png/webp (PIL, restricted to those formats)
and UTF-8 text captions are decoded, nothing is ever unpickled (no webdataset decoders).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vlp.pipeline.data.errors import READ_COUNTS, SKIP_KINDS, UserError
from vlp.pipeline.data.manifest import check_hashes, check_shards, count_samples
from vlp.pipeline.data.negatives import CaptionEditor, load_lexicon
from vlp.pipeline.data.sources import ReadSettings, Sources, check_not_all_empty, parse_sources
from vlp.pipeline.data.stream import ShardStream, StreamSpec
from vlp.pipeline.data.tokenizer import masking_spec
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS, TEXT_EXTENSIONS

STATE_FORMAT = 1
MAX_AUTO_BLOCK_SHARDS = 16
T = TypeVar("T")


@dataclass
class DataConfig:
    """The training data: shards, sampling, and the work done in the loader's workers.

    The `data:` section of a training recipe. The batch size, seed, image size and text length
    come from the rest of the training config; `build_train_loader` joins them into one
    StreamSpec.
    """

    shards: str = ""
    """Brace-expanded shard URLs, e.g. 'shards/{00000..00099}.tar'; sources separated by '::'."""
    sampling: Literal["epochs", "resampled"] = "epochs"
    """epochs: every shard once per epoch, split by rank then worker. resampled: each block's
    shards drawn with replacement (source by `weights`, then a shard uniformly); no epochs."""
    weights: list[float] | None = None
    """Sampling weight of each '::'-separated source (resampled only); default equal."""
    tokenizer: str = ""
    """tokenizer.json, its directory, or a local HF tokenizer directory."""
    num_workers: int = 2
    """Loader worker processes per rank; 0 decodes in the training process."""
    prefetch_factor: int = 2
    """Batches in flight per worker."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer (per worker)."""
    shuffle_buffer_mb: float = 512.0
    """Most sample data the shuffle buffer holds (MiB per worker): past it, samples leave the
    buffer early, so shards of large images (or compressed shards) cannot exhaust memory."""
    verify: Literal["size", "sha256", "none"] = "size"
    """Before training, compare the local shards with manifest.json: size (one stat per shard,
    on rank 0 alone), or size and sha256 (reads every shard once, shared out between the ranks),
    or not at all. A shard that changed since `vlp data index` would change the epoch and break
    exact resume."""
    max_member_mb: float = 16.0
    """Largest image or caption member read into memory (MiB); a sample with a larger one is
    skipped unread (oversized_member)."""
    read_buffer_mb: float = 1.0
    """One ranged request to an object store (MiB; the read buffer for http(s) and local
    shards): a job's request rate is its read throughput / this, so raise it to stay under the
    store's limit (S3: 5,500 GETs/s per prefix; 64 nodes read about 30 GB/s)."""
    read_concurrency: int = 1
    """Ranged requests in flight per shard read from an object store (threads in each loader
    worker), for stores whose single connection is slower than a worker decodes."""
    read_retries: int = 3
    """A failed ranged request is tried again this many times (0.5 s, 1 s, 2 s, ... apart)
    before its shard counts as unreadable; every retry is counted (data/retries)."""
    max_unreadable_share: float = 0.05
    """Stop the run (exit 4) when more than this share of the shard reads failed
    (data/skipped_unreadable_shard over data/shard_reads, judged from 20 reads on, on logging
    steps): a store that is down or denies access ends the job with one error instead of
    training on what is left. 1: never."""
    block_shards: int | None = None
    """Shards shuffled together; also the most a resume re-reads. None: enough shards to hold
    twice the shuffle buffer (from the manifest's mean shard size), at most 16."""
    mlm_probability: float = 0.15
    """Share of caption tokens the MLM objective predicts (BERT's 80/10/10 split of them)."""
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    """Member extensions tried for the image, first present wins."""
    caption_key: str = "txt"
    """Member extension of the caption."""
    lexicon: str | None = None
    """A word-class lexicon JSON (vlp.pipeline.data.negatives: colours, sizes, places, ...) for
    `edited_negatives`. The synthetic world writes its own (world/lexicon.json)."""
    edited_negatives: bool = False
    """Each caption also gets an edited copy, one lexicon word replaced or two swapped, which ITC
    and ITM train on as a negative of its image (NegCLIP). Needs `lexicon`."""
    edit_class_weights: dict = field(default_factory=dict)
    """{lexicon class: weight}: how much more likely an edit of a word of that class is than of
    a class not named (weight 1), e.g. {shape: 3}."""

    def __post_init__(self):
        checks = [
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.prefetch_factor >= 1, f"prefetch_factor must be >= 1, got {self.prefetch_factor}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (0 < self.max_member_mb < math.inf,
             f"max_member_mb must be a finite number > 0, got {self.max_member_mb}"),
            (0 < self.shuffle_buffer_mb < math.inf,
             f"shuffle_buffer_mb must be a finite number > 0, got {self.shuffle_buffer_mb}"),
            (1 / 1024 <= self.read_buffer_mb <= 1024,
             f"read_buffer_mb must be in [1/1024, 1024], got {self.read_buffer_mb}"),
            (1 <= self.read_concurrency <= 64,
             f"read_concurrency must be in [1, 64], got {self.read_concurrency}"),
            (0 <= self.read_retries <= 10,
             f"read_retries must be in [0, 10], got {self.read_retries}"),
            (0 <= self.max_unreadable_share <= 1,
             f"max_unreadable_share must be in [0, 1], got {self.max_unreadable_share}"),
            (self.block_shards is None or self.block_shards >= 1,
             f"block_shards must be >= 1 or null, got {self.block_shards}"),
            (0.0 < self.mlm_probability < 1.0,
             f"mlm_probability must be in (0, 1), got {self.mlm_probability}"),
            (self.lexicon or not self.edited_negatives,
             "edited_negatives needs data.lexicon (a word-class JSON)"),
            (all(isinstance(w, (int, float)) and 0 < w < math.inf
                 for w in self.edit_class_weights.values()),
             f"edit_class_weights {self.edit_class_weights} must be finite numbers > 0"),
            (self.weights is None or self.sampling == "resampled",
             "weights only apply with sampling=resampled: set it or drop the weights"),
            (self.weights is None or min(self.weights, default=0) > 0,
             f"weights {self.weights} must be positive numbers"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"data.{message}")
        refused = [k for k in (*self.image_keys, self.caption_key)
                   if k.lower() not in IMAGE_EXTENSIONS + TEXT_EXTENSIONS]
        if refused:
            raise UserError(
                f"refusing to decode {refused} members: only images ({', '.join(IMAGE_EXTENSIONS)})"
                f" and captions ({', '.join(TEXT_EXTENSIONS)}) are decoded; pickle-based formats "
                "(.pyd, .pth, .pickle) run code when loaded and are never unpickled.")
        if not self.image_keys or any(k.lower() not in IMAGE_EXTENSIONS for k in self.image_keys):
            raise UserError(f"data.image_keys {self.image_keys} must be among {IMAGE_EXTENSIONS}")
        if self.caption_key.lower() not in TEXT_EXTENSIONS:
            raise UserError(f"data.caption_key {self.caption_key!r} must be one of "
                            f"{TEXT_EXTENSIONS}")


class TrainLoader:
    """Endless iterator of batch dicts that knows the position of the last batch it handed out.

    A batch: images uint8 (B, 3, S, S), text_ids long (B, L), text_mask bool (B, L), mlm_ids
    long (B, L), mlm_labels long (B, L) (-100 where nothing is predicted), with
    `edited_negatives` neg_ids long (B, L), neg_mask bool (B, L) and has_neg bool (B,), keys
    list[str], and bookkeeping: worker int, position [epoch, block, emitted], skipped {kind: count}.
    """

    def __init__(self, stream: ShardStream, num_workers: int, prefetch_factor: int):
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._iterator: Iterator[dict] | None = None
        self._batches_consumed = 0
        self._positions: dict[int, list[int]] = {}
        self._base_skipped: dict[str, int] = {}
        self._worker_skipped: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self._iterator is None:
                self._iterator = self._start()
            batch = next(self._iterator)
            self._record(batch)
            yield batch

    def _start(self) -> Iterator[dict]:
        self._base_skipped = self.counts()  # new workers count from zero
        self._worker_skipped = {}
        self.stream.positions = {w: tuple(p) for w, p in self._positions.items()}
        self.stream.batches_consumed = self._batches_consumed
        if self.num_workers == 0:
            return iter(self.stream)
        # An own generator: DataLoader draws its workers' base seed from it, which must not
        # consume the trainer's global RNG (that would shift it after a resume).
        return iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor,
                               pin_memory=torch.cuda.is_available(),
                               generator=torch.Generator().manual_seed(0)))

    def _record(self, batch: dict) -> None:
        expected = self._batches_consumed % self.stream.spec.num_workers
        if batch["worker"] != expected:  # the round-robin order resume relies on was broken
            raise RuntimeError(f"batch {self._batches_consumed} came from loader worker "
                               f"{batch['worker']}, expected {expected}")
        self._positions[expected] = list(batch["position"])
        self._worker_skipped[expected] = batch["skipped"]
        self._batches_consumed += 1

    def counts(self) -> dict[str, int]:
        """The skips (errors.SKIP_KINDS) and reads (errors.READ_COUNTS) so far on this rank;
        every kind present."""
        total = dict.fromkeys([*SKIP_KINDS, *READ_COUNTS], 0)
        for counts in (self._base_skipped, *self._worker_skipped.values()):
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def skipped_counts(self) -> dict[str, int]:
        """Samples (or shard reads) skipped so far on this rank, by kind; all kinds present."""
        return {kind: n for kind, n in self.counts().items() if kind not in READ_COUNTS}

    def state_dict(self) -> dict:
        """This rank's position (JSON-serialisable); ranks differ, so save one per rank."""
        return {
            "format": STATE_FORMAT,
            "stream": _stream_identity(self.stream.spec),
            "batches_consumed": self._batches_consumed,
            "positions": {str(w): list(p) for w, p in sorted(self._positions.items())},
            "skipped": self.counts(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch consumed when `state` was taken."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state of format {STATE_FORMAT}: {str(state)[:200]}")
        mine = _stream_identity(self.stream.spec)
        theirs = state["stream"]
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            details = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {mine.get(k)!r}"
                                for k in changed)
            raise ValueError(
                f"cannot resume the data stream exactly, its inputs changed ({details}). Use the "
                "checkpoint's values, or start the data order afresh by not loading the loader "
                "state.")
        self.close()
        self._batches_consumed = int(state["batches_consumed"])
        self._positions = {int(w): list(p) for w, p in state["positions"].items()}
        self._base_skipped = dict(state["skipped"])
        self._worker_skipped = {}

    def continue_after(self, states: list[dict]) -> None:
        """Start after every position in `states`, the loader states of all ranks of a run with
        another world size (those cannot resume exactly: positions are per rank and worker):
        at the next epoch on every worker (resampled: the next block index, which seeds the
        draws). Skip counts carry over, summed over those ranks."""
        positions = [p for state in states for p in state["positions"].values()]
        if self.stream.spec.resampled:
            start = [0, max((p[1] for p in positions), default=-1) + 1, 0]
        else:
            start = [max((p[0] for p in positions), default=-1) + 1, 0, 0]
        self.close()
        self._batches_consumed = 0
        self._positions = {w: list(start) for w in range(self.stream.spec.num_workers)}
        self._base_skipped = {}
        for state in states:
            for kind, n in state["skipped"].items():
                self._base_skipped[kind] = self._base_skipped.get(kind, 0) + n
        self._worker_skipped = {}

    def close(self) -> None:
        """Stop the worker processes; iterating again restarts them at the current position."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _stream_identity(spec: StreamSpec) -> dict:
    """The inputs that decide which samples each logical worker emits, in which order."""
    names = [[url.rsplit("/", 1)[-1] for url in source] for source in spec.sources]
    shards = json.dumps(names).encode()  # file names only: moving the data keeps the stream
    return {
        "shards_sha256": hashlib.sha256(shards).hexdigest(), "num_shards": len(spec.all_urls),
        "weights": list(spec.weights) if spec.weights else None, "resampled": spec.resampled,
        "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
        "num_workers": spec.num_workers, "block_shards": spec.block_shards,
        "shuffle_buffer": spec.shuffle_buffer, "shuffle_buffer_bytes": spec.shuffle_buffer_bytes,
    }


@dataclass(frozen=True)
class ShardPlan:
    """The checked shards of a job and their sample counts, the same on every rank."""

    sources: Sources
    counts: dict[str, int]


def build_train_loader(config: DataConfig, tokenizer, *, batch_size: int, seed: int,
                       image_size: int, max_text_len: int, rank: int,
                       world_size: int) -> TrainLoader:
    """Validate everything that can be checked up front, then build the (lazy) loader.

    Under torch.distributed the shard checks (plan_shards: a stat of every local shard, the
    manifests) run on rank 0 alone and the others receive the result: at 64 nodes every rank
    checking 41k shards made 21M stat calls on the shared file system at start-up. With
    verify=sha256 each rank still hashes its share."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of size {world_size}")
    plan = on_rank0(lambda: plan_shards(config, batch_size, world_size))
    if config.verify == "sha256":
        check_hashes(plan.sources.all_urls, part=(rank, world_size))
    counts = plan.counts
    spec = StreamSpec(
        sources=plan.sources.urls,
        weights=tuple(config.weights) if config.weights else None,
        resampled=config.sampling == "resampled", seed=seed, rank=rank, world_size=world_size,
        num_workers=max(1, config.num_workers),
        block_shards=config.block_shards or _auto_block_shards(counts, config.shuffle_buffer),
        shuffle_buffer=config.shuffle_buffer,
        shuffle_buffer_bytes=int(config.shuffle_buffer_mb * 2**20),
        max_member_bytes=int(config.max_member_mb * 2**20),
        batch_size=batch_size,
        image_size=image_size, max_text_len=max_text_len,
        image_keys=tuple(k.lower() for k in config.image_keys),
        caption_key=config.caption_key.lower(),
        masking=masking_spec(tokenizer, config.mlm_probability),
        editor=(CaptionEditor(load_lexicon(config.lexicon),
                              class_weights=config.edit_class_weights)
                if config.edited_negatives else None),
        reading=ReadSettings(int(config.read_buffer_mb * 2**20), config.read_concurrency,
                             config.read_retries))
    return TrainLoader(ShardStream(spec, tokenizer), config.num_workers, config.prefetch_factor)


class UnreadableShards(RuntimeError):
    """More of the shard reads failed than data.max_unreadable_share allows."""


MIN_READS_JUDGED = 20  # fewer reads say little: one failure in 3 is not a broken store


def check_readable(counts: dict[str, int], max_share: float) -> None:
    """UnreadableShards when more than `max_share` of the shard reads in `counts` (the loader's
    counts, summed over ranks) failed, once there are MIN_READS_JUDGED of them."""
    reads, failed = counts["shard_reads"], counts["unreadable_shard"]
    if reads >= MIN_READS_JUDGED and failed > max_share * reads:
        raise UnreadableShards(
            f"{failed} of {reads} shard reads failed ({failed / reads:.0%}, more than "
            f"data.max_unreadable_share={max_share:g}; {counts['read_retries']} retried "
            "requests): the store or file system is failing. Check its endpoint, credentials "
            "and request-rate limits (data.read_buffer_mb sets the request size), then resume.")


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() on rank 0 alone when torch.distributed runs, its result broadcast to every rank; a
    UserError it raises is raised on every rank. Without a process group: fn()."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [fn()]
        except UserError as exc:
            box = [exc]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def plan_shards(config: DataConfig, batch_size: int, world_size: int) -> ShardPlan:
    """Expand the shard patterns, check the shards against their manifests (data.verify: the
    size of each) and count the samples; UserError naming the first problem."""
    sources = parse_sources(config.shards)
    urls = sources.all_urls
    resampled = config.sampling == "resampled"
    streams = world_size * max(1, config.num_workers)
    if not resampled and len(urls) < streams:
        most = len(urls) // world_size
        fix = (f"set data.num_workers to at most {most}" if most else
               f"use at most {len(urls)} ranks") + (", write more (smaller) shards with `vlp data "
                                                     "reshard`, or use data.sampling=resampled")
        raise UserError(
            f"{len(urls)} shards cannot feed {world_size} ranks x {max(1, config.num_workers)} "
            f"workers = {streams} streams (each needs at least one shard per epoch): {fix}.")
    if config.weights is not None and len(config.weights) != len(sources.urls):
        raise UserError(f"data.weights {config.weights} must be {len(sources.urls)} numbers, "
                        "one per '::'-separated source")
    check_not_all_empty(urls)
    check_shards(urls, config.verify)
    counts = count_samples(urls)
    samples = sum(counts.values())
    if samples < batch_size * world_size:
        raise UserError(f"an epoch of {samples} samples is less than one step of batch_size "
                        f"{batch_size} x {world_size} ranks; lower optim.batch_size")
    return ShardPlan(sources, counts)


def _auto_block_shards(counts: dict[str, int], shuffle_buffer: int) -> int:
    """Enough shards per block to hold twice the shuffle buffer, so blocks rarely limit mixing."""
    mean_shard = max(1.0, sum(counts.values()) / len(counts))
    return min(MAX_AUTO_BLOCK_SHARDS, max(1, math.ceil(2 * shuffle_buffer / mean_shard)))
