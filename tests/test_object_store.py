"""Shards and their manifest in S3, served by moto's S3 server on 127.0.0.1: the same stream as
from local files, a sample-exact resume, and one clear error for an unreachable endpoint."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from s3_helpers import SECRET, clear_filesystems, failing_proxy, moto_s3, upload_folder
from test_loader import build_tokenizer, jpeg, loader_for, make_dataset, take

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.sources import read_beside

pytest.importorskip("s3fs", reason="install the s3 extra: pip install '.[s3]'")
pytest.importorskip("moto.server", reason="install the dev extra: pip install '.[dev]'")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """6 shards x 10 samples and their manifest in s3://vlp-data/train/, a retrieval shard in
    s3://vlp-data/eval/; yields (s3 pattern, local pattern, local folder of the retrieval shard)."""
    local = make_dataset(tmp_path_factory.mktemp("shards"), shards=6, per_shard=10)
    eval_dir = tmp_path_factory.mktemp("eval")
    write_retrieval_shard(eval_dir / "retrieval-000000.tar")
    with moto_s3():
        upload_folder(Path(local.split("{")[0]), "vlp-data/train")
        upload_folder(eval_dir, "vlp-data/eval")
        yield "s3://vlp-data/train/{00000..00005}.tar", local, eval_dir


def write_retrieval_shard(path: Path) -> None:
    """A CLIP_benchmark-style retrieval shard: 4 images, 2 captions each."""
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            for name, data in ((f"{i:06d}.jpg", jpeg(i)),
                               (f"{i:06d}.txt", f"caption {i} a\ncaption {i} b".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_shards_give_the_same_stream_as_local_files(bucket, tokenizer, workers):
    remote_pattern, local_pattern, _ = bucket
    remote = loader_for(remote_pattern, tokenizer, num_workers=workers)  # reads the manifest
    local = loader_for(local_pattern, tokenizer, num_workers=workers)
    for got, expected in zip(take(remote, 8), take(local, 8)):
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["images"], expected["images"])
    assert remote.state_dict() == local.state_dict()
    assert remote.skipped_counts() == local.skipped_counts()
    assert not any(remote.skipped_counts().values())
    remote.close()
    local.close()


def test_manifest_beside_s3_shards_is_read_and_a_missing_file_is_none(bucket):
    manifest = json.loads(read_beside("s3://vlp-data/train/00000.tar", "manifest.json"))
    assert manifest["total_samples"] == 60
    assert read_beside("s3://vlp-data/train/00000.tar", "sizes.json") is None


def test_resume_from_s3_is_sample_exact(bucket, tokenizer):
    remote_pattern, local_pattern, _ = bucket
    reference = take(loader_for(local_pattern, tokenizer), 20)  # 80 samples: over an epoch
    interrupted = loader_for(remote_pattern, tokenizer)
    take(interrupted, 7)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = loader_for(remote_pattern, tokenizer)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[7:], take(resumed, 13)):
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["text_ids"], expected["text_ids"])


def test_retrieval_shards_in_s3_load_as_from_local_files(bucket):
    from vlp.pipeline.eval.images import load_image
    from vlp.pipeline.eval.retrieval.data import load_retrieval_shards

    remote = load_retrieval_shards("s3://vlp-data/eval/retrieval-{000000..000000}.tar")
    local = load_retrieval_shards(str(bucket[2] / "retrieval-000000.tar"))
    assert remote.captions == local.captions and len(remote.captions) == 8
    assert remote.text_to_image == local.text_to_image == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [ref.read() for ref in remote.images] == [jpeg(i) for i in range(4)]
    assert torch.equal(load_image(remote.images[2], 32), load_image(local.images[2], 32))


def test_a_shard_the_store_fails_to_serve_mid_run_is_skipped_and_counted(bucket):
    from vlp.pipeline.data.tar import SkipCounter, iter_samples

    skipped = SkipCounter()
    urls = ("s3://vlp-data/train/gone.tar", "s3://vlp-data/train/00001.tar")
    keys = [sample["__key__"] for url in urls
            for sample in iter_samples(url, frozenset({"jpg", "txt"}), skipped)]
    assert skipped.counts == {"unreadable_shard": 1}
    assert keys == [f"001{j:04d}" for j in range(10)]  # the next shard is read as usual


def test_a_missing_object_is_a_clear_error(bucket, tokenizer):
    with pytest.raises(UserError, match=r"shard 's3://vlp-data/nothing/00000.tar' does not exist"):
        loader_for("s3://vlp-data/nothing/{00000..00001}.tar", tokenizer)


def test_an_unreachable_endpoint_is_one_clear_error_without_credentials(bucket, tokenizer,
                                                                        monkeypatch, capfd):
    from vlp.pipeline.distributed import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_filesystems()
    try:
        with pytest.raises(UserError) as error:
            loader_for(bucket[0], tokenizer)
    finally:
        clear_filesystems()
    message = str(error.value)
    assert message.startswith("cannot read 's3://vlp-data/train/00000.tar': "
                              "EndpointConnectionError")
    assert "AWS_ENDPOINT_URL" in message
    printed = capfd.readouterr()
    assert SECRET not in message + printed.out + printed.err


@contextlib.contextmanager
def store_failing(fails, monkeypatch):
    """The bucket's store behind failing_proxy(fails), without botocore's own retries."""
    with failing_proxy(os.environ["AWS_ENDPOINT_URL"], fails) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        clear_filesystems()
        try:
            yield
        finally:
            clear_filesystems()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_failed_ranged_read_is_retried_and_counted_and_the_stream_is_unchanged(
        bucket, tokenizer, monkeypatch, concurrency):
    """Every 4 KiB ranged read of shard 00002 (51,200 bytes: 10 or more reads up to its end
    marker) fails once: each is tried again, the epoch has the local files' samples in their
    order, and one retry per distinct request is counted."""
    remote_pattern, local_pattern, _ = bucket
    seen, lock = set(), threading.Lock()

    def first_try_of_00002(path, byte_range):
        with lock:
            first = "00002.tar" in path and byte_range and (path, byte_range) not in seen
            seen.add((path, byte_range))
            return first

    block = 4096
    with store_failing(first_try_of_00002, monkeypatch):
        remote = loader_for(remote_pattern, tokenizer, read_buffer_mb=block / 2**20,
                            read_concurrency=concurrency, read_retries=1)
        got = [batch["keys"] for batch in take(remote, 15)]  # 60 samples: the whole epoch
    assert got == [batch["keys"] for batch in take(loader_for(local_pattern, tokenizer), 15)]
    counts = remote.counts()
    requests = [byte_range for path, byte_range in seen if "00002.tar" in path and byte_range]
    assert counts["read_retries"] == len(requests) >= 10
    assert (counts["shard_reads"], counts["unreadable_shard"]) == (6, 0)


def test_a_shard_the_store_never_serves_is_counted_unreadable_after_its_retries(
        bucket, tokenizer, monkeypatch):
    remote_pattern, _, _ = bucket
    with store_failing(lambda path, byte_range: "00003.tar" in path and byte_range, monkeypatch):
        remote = loader_for(remote_pattern, tokenizer, read_retries=2)
        keys = [key for batch in take(remote, 12) for key in batch["keys"]]  # 50 samples left
    assert not any(key.startswith("003") for key in keys)
    counts = remote.counts()
    assert (counts["shard_reads"], counts["unreadable_shard"], counts["read_retries"]) == (6, 1, 2)
