"""shard_url_pattern: one brace pattern for the shards of a manifest."""
import json

import pytest

from vlp.pipeline.data.manifest import FORMAT, shard_url_pattern


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
