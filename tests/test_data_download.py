"""img2dataset downloads from a loopback server into indexed shards, bad input included."""
from __future__ import annotations

import contextlib
import io
import json
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlp.data_prep.download import download_shards
from vlp.data_prep.server import QuietHandler, serve_directory, serve_world
from vlp.pipeline.distributed import free_port
from vlp.pipeline.data.manifest import load_manifest
from vlp.pipeline.data.tar import iter_shard, list_shards

HANG_SECONDS = 3  # longer than the 1 s --timeout the tests pass


class FaultyHandler(QuietHandler):
    """Also serves /hang (never answers in time), /notimage (bytes that are no image),
    /endless (a body that never ends) and /redirect?URL (302 to URL)."""

    def do_GET(self):
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2])
            self.end_headers()
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):  # until the client gives up
                while True:
                    self.wfile.write(bytes(1 << 16))
        elif self.path == "/hang":
            time.sleep(HANG_SECONDS)
        elif self.path == "/notimage":
            body = b"<html>this is not an image</html>"
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()


def test_world_shards_hold_every_image_with_its_caption(world_dir, shard_dir):
    manifest = load_manifest(shard_dir)
    assert manifest["total_samples"] == 160 and manifest["problems"] == []
    assert [s["samples"] for s in manifest["shards"]] == [32] * 5
    assert json.loads((shard_dir / "sizes.json").read_text())["00000.tar"] == 32
    assert manifest["shards"][0]["stats"]["successes"] == 32

    captions = dict(pd.read_parquet(world_dir / "train/url_list.parquet").itertuples(index=False))
    key, sample = next(iter_shard(list_shards(shard_dir)[0]))
    meta = json.loads(sample["json"])
    assert meta["key"] == key and sample["txt"].decode() == captions[meta["url"]]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)


def test_bad_urls_and_captions_are_skipped_and_counted(world_dir, tmp_path, capsys, vlp_data):
    with serve_directory(world_dir, handler=FaultyHandler) as base:
        image = [f"{base}/train/images/{i:06d}.jpg".encode() for i in range(6)]
        rows = [
            *(url + b",a picture" for url in image[:4]),
            f"http://127.0.0.1:{free_port()}/closed.jpg,nobody listens".encode(),
            f"{base}/no/such/image.jpg,a 404".encode(),
            f"{base}/hang,a server that never answers".encode(),
            f"{base}/notimage,html instead of an image".encode(),
            f"{base}/redirect?ftp://127.0.0.1:{free_port()}/a.jpg,a redirect to ftp".encode(),
            f"{base}/endless,a body that never ends".encode(),
            image[4] + b",",
            image[5] + b",caf\xe9 in latin-1",
            b"file:///etc/passwd,not http",
        ]
        url_list = tmp_path / "urls.csv"
        url_list.write_bytes(b"url,caption\n" + b"\n".join(rows) + b"\n")
        vlp_data(
            "download", "--url-list", url_list, "--out", tmp_path / "shards",
            "--image-size", "32", "--timeout", "1", "--threads", "4", "--allow-private-hosts",
            "--max-image-mb", "1",
        )  # fmt: skip

    manifest = load_manifest(tmp_path / "shards")
    assert manifest["total_samples"] == 4 and manifest["problems"] == []
    assert manifest["stats_totals"] == {
        "count": 10, "successes": 4, "failed_to_download": 5, "failed_to_resize": 1, "failed": 6,
    }  # fmt: skip
    assert manifest["download_errors"] == {
        "connection refused": 1, "http 404": 1, "timeout": 1, "Image decoding error": 1,
        "bad_scheme": 1, "image too large": 1,
    }  # fmt: skip
    summary = capsys.readouterr().out
    for line in ("kept: 10", "bad_scheme: 1", "empty_caption: 1", "non_utf8_caption: 1", "timeout"):
        assert line in summary


def test_refused_urls_leave_nothing_to_download(tmp_path, capsys, vlp_data):
    url_list = tmp_path / "urls.parquet"
    urls = ["file:///etc/passwd", "http://10.0.0.7/a.jpg", "http://127.0.0.1:9/images/0.jpg"]
    pd.DataFrame({"url": urls, "caption": ["a", "b", "c"]}).to_parquet(url_list)
    assert vlp_data("download", "--url-list", url_list, "--out", tmp_path / "shards") == 2
    assert re.search(r"^vlp data download: error: no URL .* left.*'bad_scheme': 1, "
                     r"'private_host': 2", capsys.readouterr().err)


def test_a_download_during_an_outage_fails_and_the_rerun_fetches_everything(world_dir, tmp_path,
                                                                           capsys, vlp_data):
    rows = pd.read_parquet(world_dir / "train/url_list.parquet")[:40]
    url_list = tmp_path / "urls.parquet"
    rows.to_parquet(url_list)
    args = ("download", "--url-list", url_list, "--out", tmp_path / "shards", "--image-size", "32",
            "--samples-per-shard", "32", "--allow-private-hosts")
    assert vlp_data(*args) == 2  # the server is down: nothing arrived
    assert re.search(r"error: no image of .* could be downloaded .*'connection refused': 40",
                     capsys.readouterr().err)
    assert not list((tmp_path / "shards").glob("*_stats.json"))  # nothing taken for done
    with serve_world(world_dir):
        # The disk fills up: writes past 40 kB fail (EFBIG) in the command and its workers
        full = subprocess.run(["vlp", "data", *map(str, args)], capture_output=True, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                    (40_000, 40_000)))
        assert full.returncode == 2, full.stderr[-2000:]
        assert re.search(r"error: 2 shard\(s\) in .* are incomplete or damaged", full.stderr)
        assert vlp_data(*args) == 0
    assert load_manifest(tmp_path / "shards")["total_samples"] == 40
    assert vlp_data("download", "--url-list", url_list, "--out", "hdfs://cluster/shards") == 2
    assert "or to object storage (s3://, gs://, ...), not to this URL" in capsys.readouterr().err
    assert not (tmp_path / "hdfs:").exists() and not Path("hdfs:").exists()


def test_a_download_logs_whole_progress_lines_not_tqdm_bars(world_dir, tmp_path):
    """In a log file (stderr not a terminal) img2dataset's tqdm bars are off and the download
    counts its finished shards in whole lines with an ETA."""
    rows = pd.read_parquet(world_dir / "train/url_list.parquet")[:40]
    rows.to_parquet(tmp_path / "urls.parquet")
    with serve_world(world_dir):
        done = subprocess.run(
            ["vlp", "data", "download", "--url-list", str(tmp_path / "urls.parquet"), "--out",
             str(tmp_path / "shards"), "--image-size", "32", "--samples-per-shard", "32",
             "--allow-private-hosts"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "it/s]" not in done.stderr
    assert re.search(r"^download: 2/2 \(100%\) \| .* \| elapsed \d+s \| ETA 0s$", done.stderr,
                     re.M), done.stderr[-2000:]


def test_a_small_download_warns_of_a_shard_that_got_nothing_and_of_too_few_shards(
        world_dir, tmp_path, capsys, vlp_data):
    """img2dataset cuts the rows into shards of --samples-per-shard, the last one shorter, so no
    shard is planned empty; one whose images all fail is deleted (to be fetched again), and the
    default 1,000 per shard leaves a small list in fewer shards than ranks x workers."""
    rows = pd.read_parquet(world_dir / "train/url_list.parquet")[:8]
    base = json.loads((world_dir / "world.json").read_text())["base_url"]
    gone = pd.DataFrame({"url": [f"{base}/no/such/{i}.jpg" for i in range(2)],
                         "caption": ["a lost picture"] * 2})
    url_list, out = tmp_path / "urls.parquet", tmp_path / "shards"
    pd.concat([rows, gone]).to_parquet(url_list)
    with serve_world(world_dir):
        assert vlp_data("download", "--url-list", url_list, "--out", out, "--image-size", "32",
                        "--samples-per-shard", "4", "--allow-private-hosts") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert warnings == [
        "warning: 1 shard(s) got no image (00002.tar: {'http 404': 2}) and were deleted, so the "
        f"shard numbers in {out} have a gap: rerun this command to fetch them again before "
        "training on the whole range",
        f"warning: {out} holds 2 shard(s) of up to 4 samples; training on them needs at least "
        "ranks x data.num_workers shards: rerun with --no-resume --samples-per-shard 1 for 10 "
        "shards"]
    assert [s["samples"] for s in load_manifest(out)["shards"]] == [4, 4]


def test_a_url_list_without_the_caption_column_is_a_clear_error(tmp_path, capsys, vlp_data):
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "title": ["a cat"]}).to_parquet(url_list)
    assert vlp_data("download", "--url-list", url_list, "--out", tmp_path / "shards") == 2
    assert "no column any of ['caption', 'TEXT', " in capsys.readouterr().err
    assert vlp_data("download", "--url-list", url_list, "--out", tmp_path / "shards",
                    "--caption-col", "headline") == 2
    assert "no column 'headline'" in capsys.readouterr().err


def test_an_interrupted_download_resumes_where_it_stopped(world_dir, shard_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    # Interrupted while writing shard 2: its tar is cut short and its stats were never written.
    (shards / "00002_stats.json").unlink()
    tar = shards / "00002.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    untouched = {p.name: p.stat().st_mtime_ns for p in list_shards(shards) if p != tar}
    sigint = signal.getsignal(signal.SIGINT)

    with serve_world(world_dir):
        summary = download_shards(
            world_dir / "train/url_list.parquet", shards, image_size=64,
            number_sample_per_shard=32, allow_private_hosts=True,
        )  # fmt: skip
    assert summary["total_samples"] == 160 and summary["problems"] == []
    assert summary["downloaded"]["count"] == 160
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(shards) if p != tar} == untouched
    assert signal.getsignal(signal.SIGINT) is sigint  # img2dataset's own handler is removed


@pytest.mark.slow
def test_pyspark_sanitises_and_downloads_a_folder_of_parts_in_local_mode(world_dir, tmp_path):
    """Three parquet parts (the last repeats a URL of the first) cleaned by Spark tasks, then
    downloaded by img2dataset's pyspark distributor: one shard per part, each URL once."""
    from pyspark.sql import SparkSession

    rows = pd.read_parquet(world_dir / "train/url_list.parquet").head(20)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, (start, stop) in enumerate([(0, 7), (7, 14), (14, 20)]):
        extra = rows[:1] if i == 2 else rows[:0]
        pd.concat([rows[start:stop], extra]).to_parquet(parts / f"part-{i}.parquet")
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("vlp-test")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1")  # faster JVM start
        .getOrCreate()
    )
    try:
        with serve_world(world_dir):
            summary = download_shards(
                parts, tmp_path / "shards", image_size=32, number_sample_per_shard=10,
                allow_private_hosts=True, distributor="pyspark",
            )  # fmt: skip
    finally:
        spark.stop()
    assert summary["sanitized"]["dropped"] == {"duplicate_url": 1}
    assert [s["samples"] for s in load_manifest(tmp_path / "shards")["shards"]] == [7, 7, 6]
    assert summary["problems"] == []


def test_no_resume_deletes_only_what_a_download_wrote(world_dir, shard_dir, tmp_path, capsys,
                                                      vlp_data):
    """`--no-resume` once deleted every *.parquet in --out, the URL list kept there included."""
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)  # a previous download: 5 shards of 32
    url_list = out / "urls.parquet"
    pd.read_parquet(world_dir / "train/url_list.parquet").head(10).to_parquet(url_list)
    args = ("download", "--url-list", url_list, "--out", out, "--image-size", "32",
            "--allow-private-hosts", "--no-resume")
    notes = out / "notes.json"  # img2dataset would take it for a shard's stats, and fail
    notes.write_text("{}")
    assert vlp_data(*args) == 2
    assert "notes.json" in capsys.readouterr().err and len(list_shards(out)) == 5
    notes.unlink()
    with serve_world(world_dir):
        assert vlp_data(*args) == 0
    assert url_list.is_file()
    assert [p.name for p in list_shards(out)] == ["00000.tar"]  # the old 00001..00004 are gone
    assert load_manifest(out)["total_samples"] == 10


def test_resuming_onto_another_url_list_is_refused(world_dir, shard_dir, tmp_path, capsys,
                                                   vlp_data):
    """Resuming kept the old shards when the URL list had changed: two datasets in one folder."""
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    (out / "00004_stats.json").unlink()  # interrupted: shard 4 still to fetch
    other = tmp_path / "other.parquet"
    pd.read_parquet(world_dir / "train/url_list.parquet").iloc[::-1].to_parquet(other)
    assert vlp_data("download", "--url-list", other, "--out", out, "--image-size", "64",
                    "--number-sample-per-shard", "32", "--allow-private-hosts") == 2
    err = capsys.readouterr().err
    assert re.search(r"^vlp data download: error: .*shards were downloaded from another URL list",
                     err, re.M), err
    assert "--no-resume" in err
    assert not (out / "00004_stats.json").exists()  # nothing was fetched


@pytest.mark.parametrize("flag", ["--image-size", "--samples-per-shard", "--threads",
                                  "--processes", "--timeout"])
def test_download_counts_must_be_positive(tmp_path, capsys, vlp_data, flag):
    with pytest.raises(SystemExit) as exit_info:
        vlp_data("download", "--url-list", tmp_path / "urls.csv", "--out", tmp_path / "out",
                 flag, "-1")
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_img2dataset_options_pass_through_and_those_vlp_sets_must_agree(world_dir, shard_dir,
                                                                        tmp_path, capsys,
                                                                        vlp_data):
    """A command line written for img2dataset: its spellings, extra columns saved per sample, a
    JPEG quality, and any other option as --img2dataset-option KEY=VALUE."""
    rows = pd.read_parquet(world_dir / "train/url_list.parquet").head(8)
    rows.assign(license=[f"cc-by {i}" for i in range(8)]).to_parquet(tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    with serve_world(world_dir):
        assert vlp_data(
            "download", "--url_list", tmp_path / "urls.parquet", "--output_folder", out,
            "--output_format", "webdataset", "--input_format", "parquet", "--image_size", "64",
            "--save_additional_columns", "license", "--encode_quality", "10",
            "--enable_wandb", "false", "--img2dataset-option", "min_image_size=8",
            "--allow-private-hosts") == 0  # fmt: skip
    capsys.readouterr()
    licenses = {f"cc-by {i}": url for i, url in enumerate(rows["url"])}
    for _, sample in iter_shard(list_shards(out)[0]):
        meta = json.loads(sample["json"])
        assert licenses[meta["license"]] == meta["url"]
        # libjpeg scales its base table (DC 16) by 5000/quality %: 80 at quality 10, 2 at 95
        assert Image.open(io.BytesIO(sample["jpg"])).quantization[0][0] == 80
    _, default = next(iter_shard(list_shards(shard_dir)[0]))
    assert Image.open(io.BytesIO(default["jpg"])).quantization[0][0] == 2

    refused = {
        ("--output_format", "tfrecord"): "img2dataset's output_format=tfrecord: vlp sets it to "
                                         "webdataset",
        ("--img2dataset-option", "url_col=URL"): "vlp sets it to url (the column of the "
                                                 "sanitised list; name your list's column with "
                                                 "--url-col)",
        ("--img2dataset-option", "thread_count=4"): "vlp has it as --threads",
        ("--img2dataset-option", "no_such=1"): "img2dataset has no such option",
        ("--img2dataset-option", "min_image_size=big"): "min_image_size=big: not a int",
    }
    for args, message in refused.items():
        assert vlp_data("download", "--url-list", tmp_path / "urls.parquet", "--out",
                        tmp_path / "other", *args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_of_local_images_is_ingested_without_a_server(world_dir, tmp_path, capsys,
                                                               vlp_data):
    """Images captioned by the .txt beside them; a link out of the folder is not followed, and
    the fetch refuses a file URL outside the folder even when asked for it directly."""
    from vlp.data_prep.fetch import FetchRefused, read_local
    from vlp.data_prep.local_images import image_root

    folder, out = tmp_path / "photos", tmp_path / "shards"
    (folder / "day1").mkdir(parents=True)
    images = [world_dir / f"train/images/{i:06d}.jpg" for i in range(3)]
    for i, source in enumerate(images):
        shutil.copy(source, folder / "day1" / f"{i}.JPG")
    (folder / "day1/0.txt").write_text("a photo from day one\n")
    (folder / "day1/1.txt").write_text("another photo")  # 2.JPG has no caption
    outside = tmp_path / "outside.jpg"
    shutil.copy(images[0], outside)
    (folder / "link.jpg").symlink_to(outside)
    (folder / "link.txt").write_text("a link out of the folder")

    assert vlp_data("download", "--images", folder, "--out", out, "--image-size", "32") == 0
    assert "missing_caption: 1" in capsys.readouterr().out
    captions = sorted(s["txt"].decode() for _, s in iter_shard(list_shards(out)[0]))
    assert captions == ["a photo from day one", "another photo"]
    with pytest.raises(FetchRefused, match="outside the --images folder"):
        read_local((folder / "link.jpg").as_uri(), image_root(folder), 1 << 20)
