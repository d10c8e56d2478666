"""Indexing shard directories: counts from the tars themselves, every problem reported."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import webdataset as wds

from vlp.data_prep.index import build_manifest
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.manifest import load_manifest


def write_shard(path, samples):
    """An OpenCLIP-style shard written by another tool: no stats file beside it."""
    with wds.TarWriter(str(path)) as sink:
        for key, caption in samples:
            sample = {"__key__": key, "jpg": b"\xff\xd8 not decoded by the index"}
            if caption is not None:
                sample["txt"] = caption
            sink.write(sample)


def problems_by_kind(manifest):
    return {(p["shard"], p["kind"]) for p in manifest["problems"]}


def test_shards_from_other_tools_index_and_their_bad_captions_are_counted(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", [("a", b"a cat"), ("b", b""), ("c", b"caf\xe9")])
    write_shard(tmp_path / "shard-000001.tar", [("d", None), ("e", b"a dog")])

    manifest = build_manifest(tmp_path)

    assert manifest["total_samples"] == 5
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "shard-000000.tar": 3,
        "shard-000001.tar": 2,
    }
    issues = {"empty_caption": 1, "non_utf8_caption": 1, "missing_caption": 1}
    assert manifest["sample_issues"] == issues
    assert problems_by_kind(manifest) == {
        ("shard-000000.tar", "missing_stats"),
        ("shard-000001.tar", "missing_stats"),
    }
    first = manifest["shards"][0]
    tar_bytes = (tmp_path / "shard-000000.tar").read_bytes()
    assert first["sha256"] == hashlib.sha256(tar_bytes).hexdigest()
    assert first["stats"] is None and load_manifest(tmp_path) == manifest


def test_damaged_and_inconsistent_img2dataset_shards_are_reported(shard_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    truncated = shards / "00001.tar"
    truncated.write_bytes(truncated.read_bytes()[:20_000])  # cut inside a member
    stats = json.loads((shards / "00002_stats.json").read_text())
    (shards / "00002_stats.json").write_text(json.dumps({**stats, "successes": 31}))
    (shards / "00003_stats.json").write_text("{not json")
    (shards / "00004.tar").unlink()

    manifest = build_manifest(shards)

    assert problems_by_kind(manifest) == {
        ("00001.tar", "corrupt_tar"),
        ("00001.tar", "count_mismatch"),
        ("00002.tar", "count_mismatch"),
        ("00003.tar", "bad_stats"),
        ("00004.tar", "missing_tar"),
    }
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes["00000.tar"] == 32 and 0 < sizes["00001.tar"] < 32 and "00004.tar" not in sizes


def test_a_directory_without_shards_is_an_error_and_writes_no_manifest(tmp_path):
    with pytest.raises(UserError, match="no \\*.tar shards"):
        build_manifest(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_load_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="vlp data index"):
        load_manifest(tmp_path)


def test_counts_from_stats_agree_with_the_tars_and_skip_reading_them(shard_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    full = build_manifest(shards)
    quick = build_manifest(shards, from_stats=True, processes=2)
    assert [s["samples"] for s in quick["shards"]] == [s["samples"] for s in full["shards"]]
    assert quick["problems"] == [] and quick["counted_from"] == "stats"
    assert "sha256" not in quick["shards"][0]  # the loader's sha256 check needs the full index


def test_counts_from_stats_still_find_cut_shards_and_read_those_without_stats(shard_dir,
                                                                              tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    cut = shards / "00001.tar"
    cut.write_bytes(cut.read_bytes()[:20_480])  # whole blocks, but no end-of-archive marker
    (shards / "00003_stats.json").write_text("{not json")

    manifest = build_manifest(shards, from_stats=True)

    assert problems_by_kind(manifest) == {("00001.tar", "corrupt_tar"), ("00003.tar", "bad_stats")}
    assert manifest["shards"][3]["samples"] == 32  # counted from the tar itself
