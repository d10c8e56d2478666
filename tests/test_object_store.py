"""Shards and their manifest in S3, served by moto's S3 server on 127.0.0.1: the same stream as
from local files, a sample-exact resume, and one clear error for an unreachable endpoint."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from s3_helpers import SECRET, clear_filesystems, moto_s3, upload_folder
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
