"""Shard URLs: brace patterns split into sources, every refused URL with its message, the scheme
rules, the slow-download guard on a clock the test sets, and local, gzip and http(s) shards (a
loopback server) opened and read beside. Object storage is in tests/test_object_store.py."""
from __future__ import annotations

import functools
import gzip
import http.server
import socket
import threading
import time

import pytest

from vlp.pipeline.data import sources
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.sources import (
    RateGuardedResponse,
    ReadSettings,
    Sources,
    check_not_all_empty,
    check_url,
    local_path,
    open_shard,
    parse_sources,
    read_beside,
    url_scheme,
)


def refusal(call, *args) -> str:
    with pytest.raises(UserError) as error:
        call(*args)
    return str(error.value)


@pytest.fixture
def shards(tmp_path):
    for name in ("a0.tar", "a1.tar", "b00.tar", "b01.tar", "b02.tar"):
        (tmp_path / name).write_bytes(name.encode())
    return tmp_path


def test_a_pattern_splits_on_double_colons_and_expands_each_source_in_order(shards):
    got = parse_sources(f" {shards}/a{{0..1}}.tar :: {shards}/b{{00..02}}.tar ")
    assert got == Sources(((f"{shards}/a0.tar", f"{shards}/a1.tar"),
                           (f"{shards}/b00.tar", f"{shards}/b01.tar", f"{shards}/b02.tar")))
    assert got.all_urls == [f"{shards}/a0.tar", f"{shards}/a1.tar", f"{shards}/b00.tar",
                            f"{shards}/b01.tar", f"{shards}/b02.tar"]
    assert parse_sources(f"file://{shards}/a0.tar").urls == ((f"file://{shards}/a0.tar",),)
    remote = parse_sources("https://example.org/s{0..1}.tar::http://h/x.tar")
    assert remote.urls == (("https://example.org/s0.tar", "https://example.org/s1.tar"),
                           ("http://h/x.tar",))


@pytest.mark.parametrize("shards", ["", "   ", None])
def test_no_pattern_is_an_error(shards):
    assert refusal(parse_sources, shards) == (
        "no training shards given: set data.shards to e.g. 'shards/{00000..00099}.tar'")


def test_at_most_five_overlapping_shards_are_named(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.tar").write_bytes(b"x")
    pattern = f"{tmp_path}/{{0..5}}.tar::{tmp_path}/{{0..5}}.tar"
    names = [f"{tmp_path}/{i}.tar" for i in range(5)]
    assert refusal(parse_sources, pattern).startswith(f"shard(s) listed more than once: {names};")


def test_overlapping_sources_are_refused_by_name(shards):
    pattern = f"{shards}/b{{00..01}}.tar::{shards}/b{{01..02}}.tar::{shards}/b00.tar"
    assert refusal(parse_sources, pattern) == (
        f"shard(s) listed more than once: ['{shards}/b00.tar', '{shards}/b01.tar']; each epoch "
        "would repeat their samples. Remove the overlap from the shard patterns.")


def test_a_source_that_expands_to_nothing_is_named(shards):
    pattern = f"{shards}/a0.tar:: "
    assert refusal(parse_sources, pattern) == (
        f"shard pattern ' ' in {pattern!r} expands to no URLs")


def test_each_refused_url_says_why(shards):
    assert refusal(check_url, "pipe:curl -s http://h/x.tar") == (
        "refusing shard URL 'pipe:curl -s http://h/x.tar': pipe: URLs run shell commands. "
        "Download the shards, or serve them over http(s) and list those URLs.")
    assert refusal(check_url, "ftp://h/x.tar") == (
        "unsupported shard URL 'ftp://h/x.tar': use a local path, file://, http(s)://, or an "
        "object store (s3://, s3a://, gs://, gcs://, az://, abfs://, abfss://).")
    assert refusal(check_url, f"{shards}/a*.tar") == (
        f"shard '{shards}/a*.tar': wildcards are not expanded; list shards with a brace pattern "
        "such as 'shards/{00000..00011}.tar' (one number range, zero-padded like the file names)")
    assert refusal(check_url, str(shards)) == (
        f"shard '{shards}' is a directory; name its tar files with a brace pattern such as "
        "'shards/{00000..00011}.tar'")
    assert refusal(check_url, "missing/x.tar") == (
        f"shard 'missing/x.tar' does not exist (looked for {shards.cwd()}/missing/x.tar); "
        "check data.shards or run `vlp data download`.")
    assert "does not exist" in refusal(check_url, f"file://{shards}/none.tar")
    assert "does not exist" in refusal(check_url, f"{shards}/X.tar")  # no wildcard in it
    assert "does not exist" in refusal(parse_sources, f"{shards}/a{{0..2}}.tar")


def test_accepted_urls_pass(shards):
    (shards / "odd[1].tar").write_bytes(b"x")  # a real file whose name has wildcard characters
    for url in (f"{shards}/a0.tar", f"file://{shards}/a0.tar", f"{shards}/odd[1].tar",
                "http://h/x.tar", "HTTPS://h/x.tar", "s3://bucket/x.tar", "gs://b/x.tar"):
        check_url(url)


def test_schemes_and_local_paths():
    assert [url_scheme(u) for u in ("pipe:cat x", "a/b.tar", "C:/data/x.tar", "HTTP://h/x",
                                    "file:///x.tar", "s3://b/k")] == [
        "pipe", "", "", "http", "file", "s3"]
    assert local_path("file:///data/x.tar") == "/data/x.tar"
    assert local_path("file://host/data/x.tar") == "/data/x.tar"
    assert local_path("rel/file://x.tar") == "rel/file://x.tar"
    assert local_path("data/x#1;v?.tar") == "data/x#1;v?.tar"  # not a URL: not parsed


def test_only_a_list_of_local_shards_all_empty_is_an_error(tmp_path):
    for name, data in (("e0.tar", b""), ("e1.tar", b""), ("full.tar", b"x")):
        (tmp_path / name).write_bytes(data)
    empty = [str(tmp_path / "e0.tar"), f"file://{tmp_path}/e1.tar"]
    assert refusal(check_not_all_empty, empty) == (
        f"all 2 shards are empty (0 bytes), e.g. {empty[0]!r}; the download wrote nothing. "
        "Re-run `vlp data download`.")
    check_not_all_empty(empty + [str(tmp_path / "full.tar")])
    check_not_all_empty(empty + ["http://h/x.tar"])  # a remote shard is not looked at
    check_not_all_empty([])


class Response:
    """An http.client response stand-in: `read1` hands out the next chunk."""

    def __init__(self, chunks: list[bytes]):
        self.chunks, self.closed = list(chunks), False

    def read1(self, size: int) -> bytes:
        return self.chunks.pop(0)[:size] if self.chunks else b""

    def close(self):
        self.closed = True


def test_a_download_slower_than_the_minimum_after_the_grace_period_fails(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(sources.time, "monotonic", lambda: now[0])
    rate, grace = sources.MIN_BYTES_PER_S, sources.RATE_GRACE_S
    response = Response([b"a" * 10, b"b" * 1990, b"c" * (rate * (grace + 1) - 2000), b"d"])
    stream = RateGuardedResponse(response)
    buffer = bytearray(rate * (grace + 2))
    now[0] += grace  # slow, but within the grace period
    assert stream.readinto(buffer) == 10 and buffer[:10] == b"a" * 10
    now[0] += 1  # after it, 2,000 bytes in grace + 1 s
    with pytest.raises(OSError) as error:
        stream.readinto(buffer)
    assert str(error.value) == (f"2000 bytes in {grace + 1} s: slower than the minimum {rate} "
                                "bytes/s")
    assert stream.readinto(buffer) == rate * (grace + 1) - 2000  # exactly the minimum: fine
    assert stream.readable()
    stream.close()
    assert response.closed and stream.closed


def test_local_and_gzipped_shards_open_with_the_buffer_asked_for(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"tar bytes" * 1000)  # buffers: not a block size
    for name in ("y.tar.gz", "z.tgz"):
        (tmp_path / name).write_bytes(gzip.compress(b"inner " + name.encode()))
    with open_shard(str(tmp_path / "x.tar"), ReadSettings(buffer_bytes=3000)) as stream:
        assert len(stream.peek(1)) == 3000  # what one read of the file buffers
        assert stream.read() == b"tar bytes" * 1000 and stream.raw.name == str(tmp_path / "x.tar")
    with open_shard(f"file://{tmp_path}/y.tar.gz") as stream:
        assert isinstance(stream, gzip.GzipFile) and stream.read() == b"inner y.tar.gz"
    assert stream.source.closed  # the file under the gzip stream is closed with it
    with open_shard(str(tmp_path / "z.tgz")) as stream:
        assert stream.read() == b"inner z.tgz"


@pytest.fixture
def server(tmp_path):
    """An http server on 127.0.0.1 serving tmp_path/served."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_shards_are_read_through_the_rate_guard_and_read_beside(server):
    root, base = server
    (root / "s").mkdir()
    (root / "s/00000.tar").write_bytes(b"remote tar" * 1000)
    (root / "s/00001.tar.gz").write_bytes(gzip.compress(b"remote gz"))
    (root / "s/manifest.json").write_bytes(b"{}")
    with open_shard(f"{base}/s/00000.tar", ReadSettings(buffer_bytes=3000)) as stream:
        assert isinstance(stream.raw, RateGuardedResponse) and len(stream.peek(1)) == 3000
        assert stream.read() == b"remote tar" * 1000
    with open_shard(f"{base}/s/00001.tar.gz") as stream:
        assert stream.read() == b"remote gz"
    assert read_beside(f"{base}/s/00000.tar", "manifest.json") == b"{}"
    assert read_beside(f"{base}/s/00000.tar", "sizes.json") is None  # 404


def test_a_server_that_never_answers_is_given_up_after_the_timeout(monkeypatch):
    """The connection is accepted (the listen backlog) but no response ever comes."""
    monkeypatch.setattr(sources, "HTTP_TIMEOUT_S", 0.2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/s/00000.tar"
        for attempt in (lambda: open_shard(url), lambda: read_beside(url, "manifest.json")):
            start = time.monotonic()
            try:
                assert attempt() is None  # read_beside: no file
            except OSError as error:  # open_shard: the timeout itself
                assert "timed out" in str(error)
            assert time.monotonic() - start < 3  # the timeout set, not a default


def test_read_beside_a_local_shard(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_bytes(b"local")
    (tmp_path / "dir.json").mkdir()
    assert read_beside(f"{tmp_path}/00000.tar", "manifest.json") == b"local"
    assert read_beside(f"file://{tmp_path}/00000.tar", "manifest.json") == b"local"
    assert read_beside(f"{tmp_path}/00000.tar", "missing.json") is None
    assert read_beside(f"{tmp_path}/00000.tar", "dir.json") is None
    monkeypatch.chdir(tmp_path)
    assert read_beside("00000.tar", "manifest.json") == b"local"
