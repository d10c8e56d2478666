"""The shard index the loader reads, on hand-written directories with known answers: sample counts
from manifest.json and OpenCLIP's sizes.json, and the size and sha256 checks before training."""
from __future__ import annotations

import hashlib
import json

import pytest

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.manifest import FORMAT, check_hashes, check_shards, count_samples

CHANGED = (": it changed since `vlp data index` recorded it. Restore it, or re-index the directory "
           "(a run resumed on changed shards does not continue sample-exactly); data.verify=none "
           "skips this check.")


@pytest.fixture
def index_dirs(tmp_path):
    """a/: 00000.tar (10 bytes, 4 samples) and 00001.tar (20 bytes, 6) in a manifest.json;
    b/: 00000.tar (3 bytes, 7 samples) in a sizes.json. Both directories hold a 00000.tar, and
    both lie under "my shards" (a path with a space)."""
    tmp_path = tmp_path / "my shards"
    shards = {"a/00000.tar": (b"x" * 10, 4), "a/00001.tar": (b"y" * 20, 6)}
    (tmp_path / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    entries = []
    for name, (data, samples) in shards.items():
        (tmp_path / name).write_bytes(data)
        entries.append({"name": name.split("/")[1], "samples": samples, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (tmp_path / "a/manifest.json").write_text(json.dumps({"format": FORMAT, "shards": entries}))
    (tmp_path / "b/00000.tar").write_bytes(b"zzz")
    (tmp_path / "b/sizes.json").write_text(json.dumps({"00000.tar": 7}))
    return tmp_path


def test_counts_come_from_each_directorys_own_index(index_dirs):
    urls = [str(index_dirs / name) for name in ("a/00000.tar", "b/00000.tar", "a/00001.tar")]
    assert count_samples(urls) == dict(zip(urls, [4, 7, 6]))


def test_a_bare_shard_name_reads_the_index_in_the_working_directory(index_dirs, monkeypatch):
    monkeypatch.chdir(index_dirs / "a")
    assert count_samples(["00001.tar", "00000.tar"]) == {"00001.tar": 6, "00000.tar": 4}
    check_shards(["00000.tar"], "size")
    (index_dirs / "a/00000.tar").write_bytes(b"x" * 9)
    with pytest.raises(UserError, match="^shard 00000.tar has 9 bytes, the manifest 10"):
        check_shards(["00000.tar"], "size")
    (index_dirs / "a/manifest.json").write_text("{cut short")
    with pytest.raises(UserError, match=r"^\./manifest\.json is not valid JSON"):
        count_samples(["00000.tar"])


def test_a_shard_no_index_lists_is_named(index_dirs):
    first_missing = str(index_dirs / "a/00002.tar")
    urls = [str(index_dirs / "a/00000.tar"), first_missing, str(index_dirs / "c/00000.tar")]
    with pytest.raises(UserError) as error:
        count_samples(urls)
    assert str(error.value) == (
        f"no sample count for 2 of 3 shards (e.g. {first_missing!r}): found no manifest.json or "
        "sizes.json beside them that lists them. Run `vlp data index` on the shard directory.")
    with pytest.raises(UserError, match=r"no sample count for 1 of 1 shards \(e\.g\. '.*00002"):
        count_samples([first_missing])


def test_sizes_are_checked_against_the_manifest_unless_verify_is_none(index_dirs):
    urls = [str(index_dirs / "a/00000.tar"), "file://" + str(index_dirs / "a/00001.tar"),
            str(index_dirs / "b/00000.tar"), "https://example.com/a/00000.tar"]
    check_shards(urls, "size")  # b/ has no sizes to check; https is not read
    (index_dirs / "a/00001.tar").write_bytes(b"y" * 21)
    with pytest.raises(UserError) as error:
        check_shards(urls, "size")
    assert str(error.value) == f"shard {urls[1]} has 21 bytes, the manifest 20" + CHANGED
    check_shards(urls, "none")


def test_hashes_are_checked_by_the_share_of_ranks_that_reads_each_shard(index_dirs):
    urls = [str(index_dirs / "a/00000.tar"), str(index_dirs / "a/00001.tar"),
            str(index_dirs / "b/00000.tar")]
    check_hashes(urls)
    (index_dirs / "a/00001.tar").write_bytes(b"y" * 19 + b"Y")  # same size, other bytes
    check_shards(urls, "sha256")  # sizes agree: only the hash sees it
    check_hashes(urls, part=(0, 2))  # this rank reads shards 0 and 2
    with pytest.raises(UserError) as error:
        check_hashes(urls, part=(1, 2))
    assert str(error.value) == (f"shard {urls[1]} has the manifest's size but not its sha256"
                                + CHANGED)
    with pytest.raises(UserError, match="not its sha256"):
        check_hashes(["file://" + urls[1]])
