"""TrainLoader's bookkeeping on a stub stream whose batches are written by hand: the state it
saves, the states it refuses, a restart on another world size, stopping its worker processes, the
stream identity by value, and the unreadable-shard check at its bounds. The loader on real shards
is in tests/test_loader.py."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from dataclasses import dataclass

import pytest
import torch
from test_loader import build_tokenizer, make_dataset
from torch.utils.data import IterableDataset

from vlp.pipeline.data.errors import READ_COUNTS, SKIP_KINDS, UserError
from vlp.pipeline.data.loader import (
    MAX_AUTO_BLOCK_SHARDS,
    STATE_FORMAT,
    DataConfig,
    TrainLoader,
    UnreadableShards,
    _auto_block_shards,
    build_train_loader,
    check_readable,
)
from vlp.pipeline.data.negatives import load_lexicon
from vlp.pipeline.data.sources import ReadSettings


@dataclass
class Spec:
    """The StreamSpec fields the loader's bookkeeping reads."""

    sources: tuple = (("/data/a/00000.tar", "/data/a/00001.tar"),)
    weights: tuple | None = None
    resampled: bool = False
    seed: int = 3
    rank: int = 1
    world_size: int = 2
    num_workers: int = 2
    block_shards: int = 4
    shuffle_buffer: int = 50
    shuffle_buffer_bytes: int = 1000

    @property
    def all_urls(self) -> list[str]:
        return [url for source in self.sources for url in source]


class StubStream(IterableDataset):
    """Batches from logical workers 0, 1, 0, 1, ... whose position is [epoch 2, block n,
    emitted 10 n] and whose skip counts grow by one unreadable sample per batch."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.positions, self.batches_consumed = {}, 0

    def __iter__(self):
        n = self.batches_consumed
        while True:
            yield {"worker": n % self.spec.num_workers, "position": [2, n, 10 * n],
                   "skipped": {"bad_image": n + 1}, "keys": [f"k{n}"]}
            n += 1


def loader_after(batches: int, spec: Spec | None = None, num_workers: int = 0) -> TrainLoader:
    loader = TrainLoader(StubStream(spec or Spec()), num_workers, prefetch_factor=2)
    for _, _ in zip(range(batches), loader):
        pass
    return loader


def identity(spec: Spec) -> dict:
    return loader_after(0, spec).state_dict()["stream"]


def test_the_state_holds_the_stream_identity_the_positions_and_the_counts():
    state = loader_after(3).state_dict()
    names = json.dumps([["00000.tar", "00001.tar"]]).encode()
    counts = dict.fromkeys([*SKIP_KINDS, *READ_COUNTS], 0)
    counts["bad_image"] = 2 + 3  # the last batch of each logical worker: 2 and 3
    assert state == {
        "format": STATE_FORMAT,
        "stream": {"shards_sha256": hashlib.sha256(names).hexdigest(), "num_shards": 2,
                   "weights": None, "resampled": False, "seed": 3, "rank": 1, "world_size": 2,
                   "num_workers": 2, "block_shards": 4, "shuffle_buffer": 50,
                   "shuffle_buffer_bytes": 1000},
        "batches_consumed": 3,
        "positions": {"0": [2, 2, 20], "1": [2, 1, 10]},
        "skipped": counts}


def test_the_identity_names_files_only_and_keeps_the_weights():
    moved = Spec(sources=(("s3://bucket/elsewhere/00000.tar", "00001.tar"),))
    assert identity(moved) == identity(Spec())  # moving the data keeps the stream
    weighted = identity(Spec(sources=(("a/00000.tar",), ("b/00000.tar",)), weights=(2.0, 1)))
    assert weighted["weights"] == [2.0, 1] and weighted["num_shards"] == 2
    assert weighted["shards_sha256"] == hashlib.sha256(
        json.dumps([["00000.tar"], ["00000.tar"]]).encode()).hexdigest()
    assert identity(Spec(weights=()))["weights"] is None


def test_a_loaded_state_continues_where_it_was_taken():
    state = json.loads(json.dumps(loader_after(3).state_dict()))  # as a checkpoint keeps it
    resumed = loader_after(0)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    batch = next(iter(resumed))
    assert (batch["worker"], batch["position"]) == (1, [2, 3, 30])  # the fourth batch


@pytest.mark.parametrize("state", [["format", STATE_FORMAT], {"format": STATE_FORMAT + 1},
                                   {"x": "y" * 300}])
def test_what_is_not_a_loader_state_is_refused_with_its_start(state):
    with pytest.raises(ValueError) as refused:
        loader_after(0).load_state_dict(state)
    assert str(refused.value) == (f"not a loader state of format {STATE_FORMAT}: "
                                  f"{str(state)[:200]}")


def test_a_state_of_another_stream_is_refused_naming_each_change():
    state = loader_after(2).state_dict()
    state["stream"]["seed"] = 4
    state["stream"]["added_later"] = True  # a key this version does not know
    with pytest.raises(ValueError) as refused:
        loader_after(0).load_state_dict(state)
    assert str(refused.value) == (
        "cannot resume the data stream exactly, its inputs changed (added_later: checkpoint "
        "True, now None; seed: checkpoint 4, now 3). Use the checkpoint's values, or start the "
        "data order afresh by not loading the loader state.")


@pytest.mark.parametrize("resampled, start", [(False, [8, 0, 0]), (True, [0, 12, 0])])
def test_another_world_size_starts_every_worker_after_all_the_old_positions(resampled, start):
    """Epoch-based streams start at the epoch after the latest; resampled ones at the block
    after the latest (the block index seeds the draws). Skips are summed over the old ranks."""
    states = [{"positions": {"0": [7, 3, 5], "1": [6, 11, 0]}, "skipped": {"bad_image": 2}},
              {"positions": {"0": [7, 1, 9]}, "skipped": {"bad_image": 5,
                                                          "shard_reads": 4}}]
    loader = loader_after(1, Spec(resampled=resampled, num_workers=3))
    loader.continue_after(states)
    state = loader.state_dict()
    assert state["positions"] == {"0": start, "1": start, "2": start}
    assert state["batches_consumed"] == 0
    assert (state["skipped"]["bad_image"], state["skipped"]["shard_reads"]) == (7, 4)


@pytest.mark.parametrize("resampled", [False, True])
def test_old_ranks_that_consumed_nothing_start_the_stream_from_its_beginning(resampled):
    loader = loader_after(0, Spec(resampled=resampled, num_workers=1))
    loader.continue_after([{"positions": {}, "skipped": {}}])
    assert loader.state_dict()["positions"] == {"0": [0, 0, 0]}


def test_close_stops_the_worker_processes_and_iterating_restarts_them_in_place():
    before = set(multiprocessing.active_children())
    loader = loader_after(2, num_workers=1)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1
    loader.close()
    assert not workers & set(multiprocessing.active_children())
    batch = next(iter(loader))
    assert batch["position"] == [2, 2, 20]
    loader.close()


def test_a_batch_from_the_wrong_worker_breaks_the_order_resume_relies_on():
    class Reordered(StubStream):
        def __iter__(self):
            yield {"worker": 1, "position": [0, 0, 0], "skipped": {}, "keys": []}

    with pytest.raises(RuntimeError) as refused:
        next(iter(TrainLoader(Reordered(Spec()), 0, prefetch_factor=2)))
    assert str(refused.value) == "batch 0 came from loader worker 1, expected 0"


@pytest.mark.parametrize("reads, failed, refused", [(19, 19, False), (20, 1, False),
                                                    (20, 2, True), (100, 5, False),
                                                    (100, 6, True)])
def test_unreadable_shards_are_judged_from_20_reads_on(reads, failed, refused):
    counts = {"shard_reads": reads, "unreadable_shard": failed, "read_retries": 3}
    if not refused:
        check_readable(counts, 0.05)
        return
    with pytest.raises(UnreadableShards) as stopped:
        check_readable(counts, 0.05)
    assert str(stopped.value) == (
        f"{failed} of {reads} shard reads failed ({failed / reads:.0%}, more than "
        "data.max_unreadable_share=0.05; 3 retried requests): the store or file system is "
        "failing. Check its endpoint, credentials and request-rate limits (data.read_buffer_mb "
        "sets the request size), then resume.")


def test_skipped_counts_leave_the_read_counts_out():
    loader = loader_after(1)
    assert set(loader.skipped_counts()) == set(SKIP_KINDS)
    assert loader.skipped_counts()["bad_image"] == 1


@pytest.mark.parametrize("counts, shuffle_buffer, block", [
    ({"a": 32, "b": 32}, 50, 4),  # twice the buffer over 32-sample shards: ceil(100 / 32)
    ({"a": 20, "b": 44}, 50, 4),  # the mean shard
    ({"a": 0}, 3, 6),  # empty shards count as one sample each
    ({"a": 32}, 0, 1),  # at least one shard
    ({"a": 32}, 10_000, MAX_AUTO_BLOCK_SHARDS)])
def test_a_block_holds_about_twice_the_shuffle_buffer(counts, shuffle_buffer, block):
    assert _auto_block_shards(counts, shuffle_buffer) == block


def test_worker_processes_leave_the_global_rng_alone():
    """DataLoader draws its workers' base seed from the loader's own generator: starting the
    workers (also after a resume) does not shift the trainer's random stream."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = loader_after(1, num_workers=1)
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)


class CountingStream(StubStream):
    """A StubStream that appends a line to `log` for every batch it makes."""

    def __init__(self, spec: Spec, log):
        super().__init__(spec)
        self.log = log

    def __iter__(self):
        for batch in super().__iter__():
            with open(self.log, "a") as f:
                f.write("made\n")
            yield batch


def test_a_worker_makes_prefetch_factor_batches_ahead(tmp_path):
    log = tmp_path / "made.txt"
    loader = TrainLoader(CountingStream(Spec(), log), num_workers=1, prefetch_factor=3)
    next(iter(loader))

    def made() -> int:
        return len(log.read_text().splitlines())

    deadline, last = time.monotonic() + 10, -1
    while made() != last and time.monotonic() < deadline:  # until the worker stops
        last = made()
        time.sleep(0.5)
    loader.close()
    assert last == 1 + 3  # the batch handed out and the three asked for ahead


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def built(config: DataConfig, tokenizer, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """build_train_loader with small stream settings."""
    return build_train_loader(config, tokenizer, batch_size=2, seed=0, image_size=32,
                              max_text_len=12, rank=rank, world_size=world_size)


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_its_world_is_refused(rank, world):
    with pytest.raises(UserError) as refused:
        build_train_loader(DataConfig(shards="nowhere/{00000..00001}.tar"), None, batch_size=2,
                           seed=0, image_size=32, max_text_len=12, rank=rank, world_size=world)
    assert str(refused.value) == f"rank {rank} is not in a world of size {world}"


def test_the_loader_gets_the_sizes_read_settings_and_prefetch_the_config_gives(tmp_path, tokenizer):
    config = DataConfig(shards=make_dataset(tmp_path, shards=2, per_shard=4), num_workers=0,
                        shuffle_buffer_mb=1.5, max_member_mb=0.25, read_buffer_mb=2.5,
                        read_concurrency=3, read_retries=4, prefetch_factor=3)
    loader = built(config, tokenizer, rank=1, world_size=2)
    assert (loader.num_workers, loader.prefetch_factor) == (0, 3)
    spec = loader.stream.spec
    assert (spec.shuffle_buffer_bytes, spec.max_member_bytes) == (3 * 2**19, 2**18)
    assert spec.reading == ReadSettings(5 * 2**19, 3, 4)


def test_a_skip_kind_only_a_later_version_counts_is_carried_over():
    state = loader_after(1).state_dict()
    state["skipped"]["found_later"] = 2
    resumed = loader_after(0)
    resumed.load_state_dict(state)
    assert resumed.counts()["found_later"] == 2


def test_edited_negatives_get_an_editor_of_the_lexicon_and_its_class_weights(tmp_path,
                                                                              tokenizer):
    lexicon = {"colour": [["red"], ["grey", "gray"]], "shape": [["circle"], ["square"]]}
    (tmp_path / "lexicon.json").write_text(json.dumps(lexicon))
    shards = make_dataset(tmp_path / "shards", shards=2, per_shard=4)
    editors = {}
    for edited in (True, False):
        config = DataConfig(shards=shards, num_workers=0, lexicon=str(tmp_path / "lexicon.json"),
                            edited_negatives=edited, edit_class_weights={"shape": 3.0})
        editors[edited] = built(config, tokenizer).stream.spec.editor
    assert editors[False] is None
    assert editors[True].lexicon == load_lexicon(tmp_path / "lexicon.json")
    assert editors[True].class_weights == {"shape": 3.0}


def test_with_sha256_each_rank_hashes_only_its_share_of_the_shards(tmp_path, tokenizer):
    """Shard 0's recorded sha256 is wrong: rank 0 of 2 hashes shards 0 and 2 and names it;
    rank 1 hashes shards 1 and 3 only."""
    shards = make_dataset(tmp_path, shards=4, per_shard=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = hashlib.sha256((tmp_path / entry["name"]).read_bytes()).hexdigest()
    manifest["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = DataConfig(shards=shards, num_workers=0, verify="sha256")
    assert built(config, tokenizer, rank=1, world_size=2).stream.spec.rank == 1
    with pytest.raises(UserError, match="00000.tar has the manifest's size but not its sha256"):
        built(config, tokenizer, rank=0, world_size=2)
