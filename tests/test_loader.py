"""Training data loader on real tar shards: splitting, order, exact resume, bad samples, errors."""
from __future__ import annotations

import functools
import http.server
import io
import json
import random
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.pipeline.data.loader import DataConfig, build_train_loader
from vlp.pipeline.data.stream import iter_batches, shuffled
from vlp.pipeline.data.tar import SkipCounter
from vlp.pipeline.data.tokenizer import tokenize

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "a red blue green small big circle square triangle on the left right of and".split()


# ---------------------------------------------------------------- building shards and a tokenizer

def caption(i: int) -> str:
    rng = np.random.RandomState(i)
    return " ".join(rng.choice(WORDS, size=3 + i % 6))


def jpeg(i: int, size: int = 64) -> bytes:
    rng = np.random.RandomState(i)
    pixels = (rng.rand(size // 8, size // 8, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of `members` in order (duplicates allowed), as bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_span(data: bytes) -> int:
    """Bytes one short-named member takes in a tar: header plus padded data."""
    return 512 + -(-len(data) // 512) * 512


def good_members(key: str, i: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", caption(i).encode()),
            (f"{key}.json", json.dumps({"key": key}).encode())]


def make_dataset(root: Path, shards: int, per_shard: int, extra: list | None = None,
                 prefix: str = "", extra_samples: int = 0) -> str:
    """Good shards with keys PREFIX + SSS + JJJJ, then `extra` shards (member lists or raw
    bytes, listed with `extra_samples` each), and a manifest; returns their brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        members = []
        for j in range(per_shard):
            members += good_members(f"{prefix}{s:03d}{j:04d}", s * per_shard + j)
        (root / f"{s:05d}.tar").write_bytes(tar_bytes(members))
        entries.append({"name": f"{s:05d}.tar", "samples": per_shard})
    for s, content in enumerate(extra or [], start=shards):
        path = root / f"{s:05d}.tar"
        path.write_bytes(content if isinstance(content, bytes) else tar_bytes(content))
        entries.append({"name": path.name, "samples": extra_samples})
    total = sum(e["samples"] for e in entries)
    (root / "manifest.json").write_text(json.dumps({"shards": entries, "total_samples": total}))
    return f"{root}/{{00000..{len(entries) - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def build_tokenizer():
    """A small WordPiece tokenizer trained on the test captions, wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([caption(i) for i in range(200)],
                            trainers.WordPieceTrainer(vocab_size=100, special_tokens=SPECIALS,
                                                     show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """6 shards x 10 samples."""
    return make_dataset(tmp_path_factory.mktemp("shards"), shards=6, per_shard=10)


STREAM_ARGS = dict(batch_size=4, seed=7, image_size=32, max_text_len=12)


def loader_for(shards: str, tokenizer, rank: int = 0, world: int = 1, **overrides):
    """build_train_loader on `shards` with small test settings; `overrides` go to DataConfig or
    to the stream arguments (batch_size, seed, image_size, max_text_len)."""
    stream = {**STREAM_ARGS, **{k: v for k, v in overrides.items() if k in STREAM_ARGS}}
    data = dict(shards=shards, num_workers=0, shuffle_buffer=8, block_shards=2)
    data.update({k: v for k, v in overrides.items() if k not in STREAM_ARGS})
    return build_train_loader(DataConfig(**data), tokenizer, rank=rank, world_size=world, **stream)


def take(loader, n: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def epoch_keys(shards: str, tokenizer, rank: int, world: int, workers: int, worker: int,
               epoch: int, **overrides) -> list[str]:
    """Keys one (rank, worker) stream yields in `epoch`, in order (batch_size 1: no leftovers)."""
    loader = loader_for(shards, tokenizer, rank, world, batch_size=1, num_workers=workers,
                        **overrides)
    batches = iter_batches(loader.stream.spec, tokenizer, worker, (epoch, 0, 0), SkipCounter(),
                           stop_epoch=epoch + 1)
    return [key for batch in batches for key in batch["keys"]]


# ------------------------------------------------------------------------------------- the tests

def test_batch_contents(dataset, tokenizer):
    loader = loader_for(dataset, tokenizer, max_text_len=10)
    batch = next(iter(loader))
    # uint8 pixels (the model normalises them on its device): a quarter of fp32's bytes to copy
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["images"].is_contiguous() and batch["images"].float().std() > 10
    for name in ("text_ids", "mlm_ids", "mlm_labels"):
        assert batch[name].shape == (4, 10) and batch[name].dtype == torch.long
    assert batch["text_mask"].dtype == torch.bool
    assert (batch["text_ids"][:, 0] == tokenizer.cls_token_id).all()
    labels, ids = batch["mlm_labels"], batch["text_ids"]
    predicted = labels != -100
    assert predicted.any(dim=1).all(), "every caption gets at least one MLM target"
    assert torch.equal(labels[predicted], ids[predicted])
    assert torch.equal(batch["mlm_ids"][~predicted], ids[~predicted])
    assert not (predicted & ~batch["text_mask"]).any()
    assert len(batch["keys"]) == 4 and batch["worker"] == 0
    assert loader.skipped_counts()["bad_image"] == 0


def test_rank_and_worker_split_is_a_partition_each_epoch(dataset, tokenizer):
    all_keys = sorted(f"{s:03d}{j:04d}" for s in range(6) for j in range(10))
    for epoch in (1, 2):
        seen = [key for rank in (0, 1) for worker in (0, 1)
                for key in epoch_keys(dataset, tokenizer, rank, 2, 2, worker, epoch, block_shards=1)]
        assert sorted(seen) == all_keys, "every sample exactly once per epoch"

    # The same through real DataLoader workers: 2 ranks x 2 workers, batches of one sample. A
    # stream holds at most 2 shards (20 samples), so 42 batches take every worker past epoch 0.
    seen = []
    for rank in (0, 1):
        loader = loader_for(dataset, tokenizer, rank, 2, batch_size=1, num_workers=2,
                            block_shards=1)
        seen += [b["keys"][0] for b in take(loader, 42) if b["position"][0] == 0]
        loader.close()
    assert sorted(seen) == all_keys


def test_order_depends_on_seed_and_epoch_only(dataset, tokenizer):
    first = epoch_keys(dataset, tokenizer, 0, 1, 0, 0, epoch=0)
    assert first == epoch_keys(dataset, tokenizer, 0, 1, 0, 0, epoch=0)
    assert sorted(first) == sorted(epoch_keys(dataset, tokenizer, 0, 1, 0, 0, epoch=1))
    assert first != epoch_keys(dataset, tokenizer, 0, 1, 0, 0, epoch=1)
    assert first != epoch_keys(dataset, tokenizer, 0, 1, 0, 0, epoch=0, seed=8)


@pytest.mark.parametrize("workers,world,resampled", [(0, 1, False), (2, 2, False), (2, 1, True)])
def test_resume_is_sample_exact(tmp_path, tokenizer, workers, world, resampled):
    # A bad shard and a bad sample make the skip counters part of what must resume exactly.
    bad = good_members("bad00001", 1)[1:] + good_members("bad00002", 2)
    shards = make_dataset(tmp_path, shards=8, per_shard=9, extra=[bad, b""])
    settings = dict(num_workers=workers, sampling="resampled" if resampled else "epochs")
    rank = world - 1
    reference = take(loader_for(shards, tokenizer, rank, world, **settings), 23)  # ~2.5 epochs

    interrupted = loader_for(shards, tokenizer, rank, world, **settings)
    take(interrupted, 9)  # odd: resumed workers must rotate
    state = json.loads(json.dumps(interrupted.state_dict()))
    interrupted.close()

    resumed = loader_for(shards, tokenizer, rank, world, **settings)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[9:], take(resumed, 14)):
        assert got["keys"] == expected["keys"]
        for name in ("images", "text_ids", "mlm_ids", "mlm_labels"):
            assert torch.equal(got[name], expected[name]), name
    uninterrupted = loader_for(shards, tokenizer, rank, world, **settings)
    take(uninterrupted, 23)
    assert resumed.skipped_counts() == uninterrupted.skipped_counts()
    assert resumed.state_dict() == uninterrupted.state_dict()
    resumed.close()
    uninterrupted.close()


def test_another_world_size_continues_at_the_next_epoch(tmp_path, tokenizer):
    """The loader states of a 2-rank run, one rank already in epoch 1, continued on 1 rank
    (checkpoint.change_world_size): it starts at the beginning of epoch 2, and the skip counts
    of both ranks carry over, summed."""
    bad = good_members("bad00001", 1)[1:] + good_members("bad00002", 2)
    shards = make_dataset(tmp_path, shards=8, per_shard=9, extra=[bad, b""])
    states = []
    for rank, batches in ((0, 50), (1, 3)):  # rank 0's shards hold 36-46 samples an epoch
        loader = loader_for(shards, tokenizer, rank, 2, batch_size=1)
        take(loader, batches)
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert [state["positions"]["0"][0] for state in states] == [1, 0]

    resumed = loader_for(shards, tokenizer, 0, 1, batch_size=1)
    resumed.continue_after(states)
    summed = {kind: states[0]["skipped"][kind] + states[1]["skipped"][kind]
              for kind in states[0]["skipped"]}
    assert sum(resumed.skipped_counts().values()) > 0 and summed["shard_reads"] > 0
    assert resumed.counts() == summed
    keys = [batch["keys"][0] for batch in take(resumed, 6)]
    assert keys == epoch_keys(shards, tokenizer, 0, 1, 0, 0, epoch=2)[:6]


def test_every_bad_sample_kind_is_skipped_and_counted(tmp_path, tokenizer):
    bad_samples = (
        [("ok0.jpg", jpeg(0)), ("ok0.txt", b"a red circle")]
        + [("img.jpg", b"this is not an image"), ("img.txt", b"text")]
        + [("bomb.png", bomb_png()), ("bomb.txt", b"big")]
        + [("utf.jpg", jpeg(1)), ("utf.txt", b"\xff\xfe caption")]
        + [("empty.jpg", jpeg(2)), ("empty.txt", b"  \n")]
        + [("nocap.jpg", jpeg(3)), ("nocap.json", b"{}")]
        + [("noimg.txt", b"a caption"), ("noimg.pyd", b"\x80\x04 a pickle, never loaded")]
        + [("ok0.jpg", jpeg(4)), ("ok0.txt", b"the same key again")]
        # the image again, then the caption: the first copy (an image alone) is used
        + [("twice.jpg", jpeg(5)), ("twice.jpg", jpeg(6)), ("twice.txt", b"x")]
        + [("ok1.jpg", jpeg(7)), ("ok1.txt", b"a blue square")]
    )
    members = good_members("cut0", 3) + good_members("cut1", 4)
    whole = tar_bytes(members)
    cut_in_data = whole[:512 + 100]  # inside cut0.jpg: nothing usable
    # At a header boundary after cut1.jpg (tarfile would call this a clean end): cut0 survives,
    # the incomplete cut1 is dropped.
    cut_at_header = whole[:sum(member_span(data) for _, data in members[:4])]
    garbled = bytearray(whole)
    garbled[member_span(members[0][1]) + 5] ^= 0xFF  # a byte of cut0.txt's header name
    shards = make_dataset(tmp_path, shards=1, per_shard=3,
                          extra=[bad_samples, cut_in_data, cut_at_header, bytes(garbled), b""])
    loader = loader_for(shards, tokenizer, batch_size=1)

    skipped = SkipCounter()
    batches = iter_batches(loader.stream.spec, tokenizer, 0, (0, 0, 0), skipped, stop_epoch=1)
    keys = sorted(key for batch in batches for key in batch["keys"])
    assert keys == ["0000000", "0000001", "0000002", "cut0", "ok0", "ok1"]
    assert skipped.counts == {
        "bad_image": 1, "decompression_bomb": 1, "non_utf8_caption": 1, "empty_caption": 1,
        "missing_caption": 2, "missing_image": 1, "duplicate_key": 2, "corrupt_tar": 3,
        "cut_by_damage": 2, "empty_shard": 1,  # cut1 and the garbled shard's cut0
        "shard_reads": 6}  # each of the 6 shards once in epoch 0

    # Through the loader: the stream goes on epoch after epoch and the counts reach the caller.
    batches = take(loader, 3 * len(keys))
    counts = loader.counts()
    assert counts["duplicate_key"] >= 4 and counts["empty_shard"] >= 2
    for kind, n in batches[-1]["skipped"].items():  # one worker: its counts are the total
        assert counts[kind] == n


def test_http_shards_and_manifest(dataset, tokenizer):
    root = Path(dataset.split("{")[0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{{00000..00005}}.tar"
        remote = loader_for(url, tokenizer)  # the manifest is read over http too
        local = loader_for(dataset, tokenizer)
        for got, expected in zip(take(remote, 5), take(local, 5)):
            assert got["keys"] == expected["keys"]  # same stream wherever the shards live
            assert torch.equal(got["images"], expected["images"])
        assert remote.state_dict() == local.state_dict()
    finally:
        server.shutdown()
        server.server_close()


def test_all_bad_data_stops_with_an_error_instead_of_looping(tmp_path, tokenizer):
    bad = [("a.jpg", b"not an image"), ("a.txt", b"caption")]
    shards = make_dataset(tmp_path, shards=0, per_shard=0, extra=[bad, bad], extra_samples=50)
    loader = loader_for(shards, tokenizer)
    with pytest.raises(RuntimeError, match="no usable sample in any of the 2 shards"):
        next(iter(loader))


def test_resampled_mode_follows_source_weights(tmp_path, tokenizer):
    a = make_dataset(tmp_path / "a", shards=2, per_shard=5, prefix="a")
    b = make_dataset(tmp_path / "b", shards=6, per_shard=5, prefix="b")
    loader = loader_for(f"{a}::{b}", tokenizer, sampling="resampled", weights=[3.0, 1.0],
                        block_shards=1, batch_size=16)
    keys = [key for batch in take(loader, 30) for key in batch["keys"]]
    share_a = np.mean([key.startswith("a") for key in keys])
    assert abs(share_a - 0.75) < 0.1, share_a  # by weight, not by shard count (which is 1:3)


@pytest.mark.parametrize("shards,message", [
    ("pipe:curl -s http://example.com/{0..3}.tar", "pipe: URLs run shell commands"),
    ("ftp://host/{0..3}.tar", "unsupported shard URL"),
    ("", "no training shards"),
])
def test_bad_urls_are_refused_before_any_work(tokenizer, shards, message):
    with pytest.raises(ValueError, match=message):
        loader_for(shards, tokenizer)


def test_missing_shards_and_missing_counts_are_errors(tmp_path, dataset, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        loader_for(str(tmp_path / "{00000..00003}.tar"), tokenizer)
    bare = tmp_path / "bare"
    bare.mkdir()
    for s in range(2):
        (bare / f"{s}.tar").write_bytes(tar_bytes(good_members(f"k{s}", s)))
    with pytest.raises(ValueError, match="manifest.json or sizes.json"):
        loader_for(f"{bare}/{{0..1}}.tar", tokenizer)
    (bare / "sizes.json").write_text(json.dumps({"0.tar": 20, "1.tar": 21}))  # OpenCLIP layout
    loader = loader_for(f"{bare}/{{0..1}}.tar", tokenizer, block_shards=None)
    assert loader.stream.spec.block_shards == 1  # 2 x 8-sample buffer fits in one 20-sample shard
    assert len(next(iter(loader))["keys"]) == 4


def test_shards_changed_since_indexing_are_named_before_training(tmp_path, tokenizer):
    """The manifest's sizes and sha256s were written but never read: a shard replaced with other
    content silently changed the epoch and broke exact resume."""
    from vlp.data_prep.index import build_manifest

    shards = make_dataset(tmp_path, shards=3, per_shard=6)
    build_manifest(tmp_path)  # what `vlp data index` writes: bytes and sha256 per shard
    loader_for(shards, tokenizer, verify="sha256")
    changed = tmp_path / "00001.tar"
    data = bytearray(changed.read_bytes())
    data[2048] ^= 0xFF  # same size, other content
    changed.write_bytes(bytes(data))
    loader_for(shards, tokenizer)  # the default checks sizes only
    with pytest.raises(ValueError, match=r"shard .*00001.tar has the manifest's size but not its "
                                         r"sha256: it changed since `vlp data index`"):
        loader_for(shards, tokenizer, verify="sha256")
    changed.write_bytes(bytes(data) + bytes(512))
    with pytest.raises(ValueError, match=rf"shard .*00001.tar has {len(data) + 512} bytes, the "
                                         rf"manifest {len(data)}"):
        loader_for(shards, tokenizer)
    loader_for(shards, tokenizer, verify="none")


# One rank of a 2-rank gloo world building its loader on argv[1] (shards) and argv[2] (tokenizer).
RANK_LOADER = """
import json, sys
import torch.distributed as dist
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.loader import DataConfig, build_train_loader
from vlp.pipeline.data.tokenizer import load_tokenizer
dist.init_process_group("gloo")
try:
    loader = build_train_loader(DataConfig(shards=sys.argv[1], num_workers=0),
                                load_tokenizer(sys.argv[2]), batch_size=4, seed=0, image_size=32,
                                max_text_len=12, rank=dist.get_rank(), world_size=2)
    print(json.dumps({"shards": loader.stream.spec.all_urls}))
except UserError as exc:
    print(json.dumps({"error": str(exc)}))
dist.destroy_process_group()
"""


def two_ranks_build_loaders(shards: str, tokenizer_dir: Path, cwds: list[Path]) -> list[dict]:
    """Both ranks' results, each rank started in its own working directory."""
    import os
    import subprocess
    import sys

    from vlp.pipeline.distributed import free_port

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_LOADER, shards, str(tokenizer_dir)],
                              cwd=cwd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank, cwd in enumerate(cwds)]
    return [json.loads(proc.communicate(timeout=120)[0].splitlines()[-1]) for proc in procs]


def test_only_rank_0_looks_at_the_shards_and_every_rank_gets_its_verdict(tmp_path, tokenizer):
    """Rank 1 runs where the relative shard paths do not exist: it builds its loader only if it
    never stats them (at 64 nodes every rank stat-ing 41k shards was 21M calls); a shard whose
    size differs from the manifest is the same error on both ranks."""
    make_dataset(tmp_path / "shards", shards=4, per_shard=4)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "shards/manifest.json").write_text(json.dumps({"shards": [
        {"name": f"{s:05d}.tar", "samples": 4, "bytes": (tmp_path / f"shards/{s:05d}.tar").stat(
        ).st_size} for s in range(4)]}))
    shards = "shards/{00000..00003}.tar"
    results = two_ranks_build_loaders(shards, tmp_path / "tokenizer", [tmp_path, elsewhere])
    expected = [f"shards/{s:05d}.tar" for s in range(4)]
    assert results == [{"shards": expected}] * 2
    with open(tmp_path / "shards/00002.tar", "ab") as f:
        f.write(bytes(512))
    results = two_ranks_build_loaders(shards, tmp_path / "tokenizer", [tmp_path, elsewhere])
    assert results[0] == results[1] and results[0]["error"].startswith(
        "shard shards/00002.tar has ")


def test_the_run_stops_once_more_than_the_allowed_share_of_shard_reads_failed():
    from vlp.pipeline.data.loader import UnreadableShards, check_readable

    counts = {"shard_reads": 19, "unreadable_shard": 19, "read_retries": 38}
    check_readable(counts, 0.05)  # too few reads to judge a store by
    check_readable({**counts, "shard_reads": 40, "unreadable_shard": 2}, 0.05)  # 5%: allowed
    with pytest.raises(UnreadableShards, match=r"^3 of 40 shard reads failed \(8%, more than "
                                               r"data.max_unreadable_share=0.05; 38 retried "
                                               r"requests\): the store or file system"):
        check_readable({**counts, "shard_reads": 40, "unreadable_shard": 3}, 0.05)
    check_readable({**counts, "shard_reads": 40, "unreadable_shard": 40}, 1.0)  # 1: never


def test_too_few_shards_for_ranks_times_workers(dataset, tokenizer):
    with pytest.raises(ValueError, match=r"6 shards cannot feed 2 ranks x 4 workers = 8 streams.*"
                                         r"num_workers to at most 3"):
        loader_for(dataset, tokenizer, 0, 2, num_workers=4)
    loader_for(dataset, tokenizer, 0, 2, num_workers=4, sampling="resampled")


def test_batch_tokenize_matches_the_transformers_call(tokenizer):
    texts = [caption(i) * (i % 4) for i in range(40)] + ["", "  ", "[MASK] ü 日本 left!"]
    ids, mask = tokenize(tokenizer, texts, 12)
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=12,
                         return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and ids.dtype == torch.long
    assert torch.equal(mask, expected["attention_mask"].bool())


def test_pickle_members_are_never_decoded(dataset, tokenizer):
    with pytest.raises(ValueError, match="never unpickled"):
        loader_for(dataset, tokenizer, caption_key="pyd")


def test_resume_refuses_a_changed_stream(dataset, tokenizer):
    loader = loader_for(dataset, tokenizer, num_workers=0)
    take(loader, 2)
    other = loader_for(dataset, tokenizer, num_workers=2)
    with pytest.raises(ValueError, match="num_workers: checkpoint 1, now 2"):
        other.load_state_dict(loader.state_dict())


def test_data_prep_fixtures_load(request):
    """Shards and tokenizer as `vlp data` writes them load unchanged (when conftest has them)."""
    try:
        shard_dir = Path(request.getfixturevalue("shard_dir"))
        tokenizer_dir = Path(request.getfixturevalue("tokenizer_dir"))
    except pytest.FixtureLookupError:
        pytest.skip("data_prep fixtures shard_dir/tokenizer_dir not available")
    from vlp.pipeline.data.tokenizer import load_tokenizer

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    stems = sorted(entry["name"].split(".")[0] for entry in manifest["shards"])
    pattern = f"{shard_dir}/{{{stems[0]}..{stems[-1]}}}.tar"
    real = load_tokenizer(tokenizer_dir)
    loader = loader_for(pattern, real, block_shards=None)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["keys"]) == 4
    assert sum(loader.skipped_counts().values()) == 0


def test_the_shuffle_buffer_holds_at_most_its_byte_budget():
    consumed = 0

    def samples():  # 1 MiB images, as a shard of large (or highly compressed) images gives
        nonlocal consumed
        for i in range(200):
            consumed += 1
            yield {"jpg": bytes(2**20), "txt": b"%d" % i}

    emitted, most_held = [], 0
    for sample in shuffled(samples(), 100, random.Random(0), max_bytes=int(8.5 * 2**20)):
        emitted.append(int(sample["txt"]))
        most_held = max(most_held, consumed - len(emitted) + 1)  # held before this was emitted
    assert sorted(emitted) == list(range(200)) and emitted != sorted(emitted)
    assert most_held == 9  # 8 samples fit the budget, the 9th took it over and one left
    # Under the budget the order is the plain bounded shuffle's
    small = [{"txt": b"%d" % i} for i in range(50)]
    assert list(shuffled(small, 10, random.Random(1), max_bytes=2**20)) == list(
        shuffled(small, 10, random.Random(1)))


class _RemoteShardHandler(http.server.BaseHTTPRequestHandler):
    """/huge.tar: two samples, then a member claiming 512 GiB of endless zeros; /trickle.tar: two
    samples, then a byte every 0.05 s. The sample pending when the shard is given up (1) is
    dropped with it."""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (("0.jpg", b"jpeg"), ("0.txt", b"a caption"),
                               ("1.jpg", b"jpeg"), ("1.txt", b"another")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            head = buffer.getvalue()[:buffer.tell()]
            huge = tarfile.TarInfo("2.jpg")
            huge.size = 1 << 39
            if self.path == "/huge.tar":
                head += huge.tobuf(format=tarfile.PAX_FORMAT)
        self.send_response(200)
        self.end_headers()
        try:
            self.wfile.write(head)
            while True:
                if self.path == "/trickle.tar":
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.05)
                else:
                    self.wfile.write(bytes(1 << 16))
        except OSError:  # the reader gave up
            pass


def test_remote_shards_that_never_end_are_given_up_and_counted(monkeypatch):
    from vlp.pipeline.data import sources
    from vlp.pipeline.data.tar import iter_samples

    monkeypatch.setattr(sources, "RATE_GRACE_S", 1.0)  # 60 s in a run
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RemoteShardHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name, kind in (("huge", "oversized_member"), ("trickle", "unreadable_shard")):
            skipped, started = SkipCounter(), time.monotonic()
            samples = list(iter_samples(f"http://127.0.0.1:{server.server_port}/{name}.tar",
                                        frozenset({"jpg", "txt"}), skipped))
            assert [s["__key__"] for s in samples] == ["0"]
            assert skipped.counts == {kind: 1, "cut_by_damage": 1}
            assert time.monotonic() - started < 10
    finally:
        server.shutdown()
        server.server_close()
