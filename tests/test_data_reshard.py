"""Resharding: same samples, same order, members kept together, K per shard."""
from __future__ import annotations

import io
import re
import resource
import shutil
import subprocess
import tarfile

import pytest

from vlp.data_prep.reshard import reshard
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.manifest import load_manifest
from vlp.pipeline.data.tar import iter_shard, list_shards


def all_samples(shard_dir):
    return [sample for tar in list_shards(shard_dir) for sample in iter_shard(tar)]


def test_split_and_merge_keep_every_sample_intact(shard_dir, tmp_path, vlp_data):
    vlp_data("reshard", "--in", shard_dir, "--out", tmp_path / "k50", "--samples-per-shard", 50)
    assert [s["samples"] for s in load_manifest(tmp_path / "k50")["shards"]] == [50, 50, 50, 10]
    assert load_manifest(tmp_path / "k50")["problems"] == []
    assert all_samples(tmp_path / "k50") == all_samples(shard_dir)

    summary = reshard(tmp_path / "k50", tmp_path / "one", 1000)
    assert summary["output_shards"] == 1 and summary["total_samples"] == 160
    assert all_samples(tmp_path / "one") == all_samples(shard_dir)


def test_damaged_input_keeps_what_precedes_the_damage(shard_dir, tmp_path):
    shards = tmp_path / "in"
    shutil.copytree(shard_dir, shards)
    damaged = shards / "00000.tar"
    with tarfile.open(damaged) as tar:
        cut = tar.getmembers()[12].offset  # between samples 3 and 4 (jpg, json, txt each)
    damaged.write_bytes(damaged.read_bytes()[:cut])

    summary = reshard(shards, tmp_path / "out", 40)

    assert [c["shard"] for c in summary["corrupt_inputs"]] == ["00000.tar"]
    # Samples 0-2 are kept; sample 3 may have lost members after the cut, so it is dropped.
    assert summary["samples_read"] == summary["total_samples"] == 3 + 4 * 32
    assert summary["problems"] == []


def test_reshard_refuses_to_write_over_shards(shard_dir):
    with pytest.raises(UserError, match="already holds shards"):
        reshard(shard_dir, shard_dir, 10)


def test_member_names_that_would_extract_outside_a_folder_are_not_copied(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    keys = ["ok", "../../evil", "/etc/evil", "a/../../evil", "dir/fine"]
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key in keys:
            for ext, data in (("jpg", b"jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    summary = reshard(shards, tmp_path / "out", 10)

    assert summary["samples_read"] == 5 and summary["unsafe_names_dropped"] == 3
    with tarfile.open(tmp_path / "out/00000.tar") as tar:
        names = tar.getnames()
    assert names == ["ok.jpg", "ok.txt", "dir/fine.jpg", "dir/fine.txt"]


def test_a_reshard_cut_short_by_a_full_disk_publishes_nothing(shard_dir, tmp_path):
    out = tmp_path / "out"
    # The disk fills up: a file written past 20 kB fails (EFBIG), as a new shard does
    full = subprocess.run(
        ["vlp", "data", "reshard", "--in", str(shard_dir), "--out", str(out),
         "--samples-per-shard", "10"], capture_output=True, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert full.returncode == 2
    assert re.search(r"error: reshard into .* failed: .*File too large; no shard was published",
                     full.stderr)
    assert not list(out.glob("*.tar"))
    index = subprocess.run(["vlp", "data", "index", str(out)], capture_output=True, text=True)
    assert index.returncode == 2 and "no *.tar shards" in index.stderr
    summary = reshard(shard_dir, out, 10)  # the rerun starts afresh
    assert summary["total_samples"] == 160 and not (out / ".partial").exists()


def test_index_loader_and_reshard_agree_on_samples_with_large_members(tmp_path):
    """A 17 MiB member the loader does not read (.npy) leaves its sample usable; a 17 MiB image
    makes the loader skip the sample. The index counts both as samples of the tar and the
    second as an issue; reshard copies both whole."""
    from vlp.data_prep.index import build_manifest
    from vlp.pipeline.data.tar import SkipCounter, iter_samples

    big = bytes(17 << 20)  # over the default member limit, data.max_member_mb = 16
    shards = tmp_path / "in"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in (("a.jpg", b"jpeg"), ("a.txt", b"a"), ("a.npy", big),
                           ("b.jpg", big), ("b.txt", b"b"), ("c.jpg", b"jpeg"), ("c.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    (shard,) = build_manifest(shards)["shards"]
    assert shard["samples"] == 3 and shard["sample_issues"] == {"oversized_member": 1}
    skipped = SkipCounter()
    used = [s["__key__"] for s in iter_samples(str(shards / "00000.tar"),
                                               frozenset({"jpg", "txt"}), skipped)]
    assert used == ["a", "c"] and skipped.counts == {"oversized_member": 1}
    summary = reshard(shards, tmp_path / "out", 10)
    assert summary["total_samples"] == 3 and summary["problems"] == []
    assert summary["oversized_samples_dropped"] == 0
    with tarfile.open(tmp_path / "out/00000.tar") as tar:
        assert tar.getmember("a.npy").size == tar.getmember("b.jpg").size == 17 << 20
