"""shard_url_pattern: one brace pattern for the shards of a manifest; a corrupt manifest."""
import json
import re

import pytest

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.manifest import FORMAT, count_samples, shard_url_pattern


def write_manifest(path, names):
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "shards": [{"name": n} for n in names]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_img2dataset_and_openclip_names(tmp_path):
    d = write_manifest(tmp_path / "a", ["00000.tar", "00001.tar", "00002.tar"])
    assert shard_url_pattern(d) == f"{d}/{{00000..00002}}.tar"
    d = write_manifest(tmp_path / "b", ["shard-000010.tar", "shard-000011.tar"])
    assert shard_url_pattern(d) == f"{d}/shard-{{000010..000011}}.tar"
    d = write_manifest(tmp_path / "c", ["only.tar"])
    assert shard_url_pattern(d) == f"{d}/only.tar"


@pytest.mark.parametrize("names, message", [
    (["00000.tar", "00002.tar"], "gaps"),
    (["a-00000.tar", "b-00001.tar"], "one numbered pattern"),
    ([], "no shards"),
])
def test_patterns_that_cannot_be_made(tmp_path, names, message):
    with pytest.raises(ValueError, match=message):
        shard_url_pattern(write_manifest(tmp_path, names))


@pytest.mark.parametrize("content, message", [
    ('{"format": "vlp-shard-manifest/1", "shar', "manifest.json is not valid JSON"),  # cut short
    (b"\xff\xfe", "manifest.json is not valid JSON"),
    ("[]", "manifest.json is not a vlp-shard-manifest/1 manifest"),
])
def test_a_corrupt_manifest_is_one_line(tmp_path, content, message):
    """json.loads raised a JSONDecodeError traceback (a list: AttributeError)."""
    path = tmp_path / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=f"{message}.*rebuild it with `vlp data index`"):
        shard_url_pattern(tmp_path)


def test_training_reads_no_counts_past_a_corrupt_manifest(tmp_path):
    """Training took a manifest.json that is not JSON for none and counted the epoch from
    sizes.json, unchecked against the shards; now it says which file to rebuild."""
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 20}))
    url = f"{tmp_path}/00000.tar"
    assert count_samples([url]) == {url: 20}
    (tmp_path / "manifest.json").write_text('{"format": "vlp-shard-manifest/1", "shar')
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}/manifest.json is not "
                                        "valid JSON"):
        count_samples([url])
