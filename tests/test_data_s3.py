"""`vlp data download`, `index` and `reshard` into and out of S3, served by moto's S3 server on
127.0.0.1: shards, stats, index and refused rows land in the bucket, the URL list's working files
do not, and an interrupted download resumes there."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from s3_helpers import moto_s3

from vlp.data_prep.folder import Folder
from vlp.data_prep.server import serve_world
from vlp.pipeline.data.tar import iter_shard

pytest.importorskip("s3fs", reason="install the s3 extra: pip install '.[s3]'")
pytest.importorskip("moto.server", reason="install the dev extra: pip install '.[dev]'")


def keys_in(location: str) -> list[str]:
    return [key for url in Folder(location).shards() for key, _ in iter_shard(url)]


def test_a_download_into_s3_resumes_after_an_interruption_and_reshards_in_the_bucket(
        world_dir, tmp_path, capsys, vlp_data):
    import fsspec

    rows = pd.read_parquet(world_dir / "train/url_list.parquet")[:40]
    refused = pd.DataFrame({"url": ["file:///etc/passwd"], "caption": ["not http"]})
    pd.concat([rows, refused]).to_parquet(tmp_path / "urls.parquet")
    download = ("download", "--url-list", tmp_path / "urls.parquet", "--out",
                "s3://vlp-download/shards", "--image-size", "32", "--samples-per-shard", "16",
                "--allow-private-hosts")
    with moto_s3(), serve_world(world_dir):
        assert vlp_data(*download) == 2
        assert "the bucket 'vlp-download' does not exist" in capsys.readouterr().err
        fs = fsspec.filesystem("s3")
        fs.mkdir("vlp-download")
        assert vlp_data(*download) == 0
        # Interrupted while writing shard 1: its tar cut short, its stats never written.
        fs.pipe_file("vlp-download/shards/00001.tar", fs.cat_file("vlp-download/shards/00001.tar")[:5000])
        fs.rm("vlp-download/shards/00001_stats.json")
        assert vlp_data(*download) == 0

        manifest = json.loads(fs.cat_file("vlp-download/shards/manifest.json"))
        assert (manifest["total_samples"], manifest["problems"]) == (40, [])
        assert json.loads(fs.cat_file("vlp-download/shards/sizes.json")) == {
            "00000.tar": 16, "00001.tar": 16, "00002.tar": 8}
        assert json.loads(fs.cat_file("vlp-download/shards/refused/refused_urls.json"))["dropped"] \
            == {"bad_scheme": 1}
        assert not [path for path in fs.find("vlp-download") if "_vlp_urls" in path or "/_tmp" in path]
        downloaded = keys_in("s3://vlp-download/shards")
        assert len(downloaded) == len(set(downloaded)) == 40

        assert vlp_data("reshard", "--in", "s3://vlp-download/shards", "--out", "s3://vlp-download/by25",
                        "--samples-per-shard", "25") == 0
        fs.rm(["vlp-download/by25/manifest.json", "vlp-download/by25/sizes.json"])
        assert vlp_data("index", "s3://vlp-download/by25") == 0
        resharded = json.loads(fs.cat_file("vlp-download/by25/manifest.json"))
        assert [s["samples"] for s in resharded["shards"]] == [25, 15]
        assert resharded["problems"] == [] and all(s["sha256"] for s in resharded["shards"])
        assert not [path for path in fs.find("vlp-download/by25") if ".partial" in path]
        assert keys_in("s3://vlp-download/by25") == downloaded
