"""Reading and sanitizing URL lists before anything is downloaded."""
from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from vlp.data_prep import urls
from vlp.data_prep.urls import (
    CODE,
    REASONS,
    as_utf8,
    caption_codes,
    check_batch,
    is_private_address,
    private_names,
    resolve,
    url_problem,
)

URL_PROBLEMS = [
    ("http://images.example.com/cat.jpg", None),
    ("HTTPS://8.8.8.8/x.png", None),
    ("file:///etc/passwd", "bad_scheme"),
    ("ftp://example.com/a.jpg", "bad_scheme"),
    ("example.com/no-scheme.jpg", "bad_scheme"),
    ("http://127.0.0.1:8765/a.jpg", "private_host"),
    ("http://127.1/a.jpg", "private_host"),  # legacy IPv4 notations reach loopback too
    ("http://2130706433/a.jpg", "private_host"),
    ("http://[::1]/a.jpg", "private_host"),
    ("http://[::ffff:10.0.0.1]/a.jpg", "private_host"),
    ("http://192.168.0.10/a.jpg", "private_host"),
    ("http://169.254.169.254/latest/meta-data", "private_host"),
    ("http://localhost:8000/a.jpg", "private_host"),
    ("http://[::1/a.jpg", "invalid_url"),
    ("http:///a.jpg", "invalid_url"),
    ("", "invalid_url"),
    # Percent-escapes in the host: img2dataset's fetch decodes them, so the check must too.
    ("http://%31%32%37.0.0.1:8765/x", "private_host"),
    ("http://%6c%6f%63%61%6c%68%6f%73%74/", "private_host"),
    ("http://169.254.169.%32%35%34/latest/meta-data", "private_host"),
    ("http://LocalHost./a.jpg", "private_host"),
    ("http://[fe80::1%25eth0]/a.jpg", "private_host"),
    # IPv4 carried inside IPv6: 6to4, NAT64 and IPv4-compatible forms of 127.0.0.1
    ("http://[2002:7f00:1::]/a.jpg", "private_host"),
    ("http://[64:ff9b::7f00:1]/a.jpg", "private_host"),
    ("http://[::7f00:1]/a.jpg", "private_host"),
    # Not a plain host name, dotted IPv4 or bracketed IPv6: refused even when public.
    ("http://134744072/a.jpg", "invalid_url"),  # 8.8.8.8 as one number
    ("http://010.8.8.8/a.jpg", "invalid_url"),  # octal
    ("http://exa%20mple.com/a.jpg", "invalid_url"),
    ("http://%00example.com/a.jpg", "invalid_url"),
    ("http://a..b/a.jpg", "invalid_url"),
    ("http://-a.example.com/a.jpg", "invalid_url"),
    ("http://%ff.example.com/a.jpg", "invalid_url"),  # not UTF-8
    ("http://b%C3%BCcher.example/a.jpg", None),  # IDNA: xn--bcher-kva.example
    ("http://user%2f@8.8.8.8/a.jpg", None),  # the escape is in the user name, not the host
]


@pytest.mark.parametrize("url, problem", URL_PROBLEMS)
def test_url_problem(url, problem):
    assert url_problem(url, allow_private_hosts=False) == problem


def test_host_names_that_resolve_to_private_addresses_are_refused():
    """This machine's own name resolves (through /etc/hosts) to a loopback or private address:
    the real resolver, no stub."""
    name = socket.gethostname()
    addresses = resolve(name)
    if not addresses or all(ip.is_global for ip in addresses):
        pytest.skip(f"{name} resolves to {addresses}: no private address to test with")
    assert url_problem(f"http://{name}:8080/a.jpg", allow_private_hosts=False) == "private_host"
    assert url_problem(f"http://{name.upper()}./a.jpg", allow_private_hosts=False) == "private_host"
    assert url_problem(f"http://{name}:8080/a.jpg", allow_private_hosts=True) is None
    assert resolve("name.that-does-not-exist.invalid") == ()  # kept: img2dataset reports it


def test_private_hosts_are_allowed_on_request_but_other_schemes_never():
    assert url_problem("http://127.0.0.1:8765/a.jpg", allow_private_hosts=True) is None
    assert url_problem("file:///etc/passwd", allow_private_hosts=True) == "bad_scheme"


def test_the_vectorised_check_of_a_batch_agrees_with_the_check_of_each_url():
    """url_problem (urlsplit, one URL at a time) is the oracle for check_batch's pattern path."""
    urls = [url for url, _ in URL_PROBLEMS] + [
        "http://example.com./a.jpg", "http://EXAMPLE.com/A.JPG", " https://a.example.org/x ",
        "http://example.com:8080/a b.jpg", "http://x.123a/a.jpg", "http://a_b.example.com/",
        "http://sub.localhost/a.jpg", "http://" + "a" * 64 + ".com/", "http://example.com?q=1",
        "https://bücher.example/a.jpg", None, f"http://{socket.gethostname()}:8080/a.jpg",
    ]
    batch = pa.RecordBatch.from_arrays([pa.array(urls), pa.array(["a cat"] * len(urls))],
                                       ["url", "caption"])
    with ThreadPoolExecutor(4) as pool:
        for allow in (False, True):
            checked, codes = check_batch(batch, allow, pool)
            got = [REASONS[c - 1] if c else None for c in codes]
            assert got == [url_problem(url and url.strip(), allow) for url in urls]
    assert checked.column(0)[len(URL_PROBLEMS) + 2].as_py() == "https://a.example.org/x"


def test_captions_are_refused_as_the_training_loader_would_skip_them():
    batch = pa.RecordBatch.from_arrays([
        pa.array(["http://example.com/a.jpg"] * 5),
        pa.array([b"  a red circle ", b"", b"   ", b"caf\xe9 au lait", None], pa.binary()),
    ], ["url", "caption"])
    with ThreadPoolExecutor(1) as pool:
        checked, codes = check_batch(batch, True, pool)
    assert [REASONS[c - 1] if c else None for c in codes] == [
        None, "empty_caption", "empty_caption", "non_utf8_caption", "missing_caption"]
    assert checked.column(1)[0].as_py() == "a red circle"


# Every address range the filter refuses, and public neighbours it must keep.
ADDRESSES = [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True),  # link-local; CGNAT 100.64/10
    ("100.128.0.1", False),  # just past CGNAT
    ("224.0.0.1", True), ("239.255.255.250", True),  # multicast (is_global says True)
    ("240.0.0.1", True), ("255.255.255.255", True), ("0.0.0.0", True),  # reserved, unspecified
    ("8.8.8.8", False), ("1.1.1.1", False),
    ("::1", True), ("::", True), ("fc00::1", True), ("fd12:3456::1", True), ("fe80::1", True),
    ("ff02::1", True), ("ff0e::1", True),  # multicast, link and global scope
    ("2001:4860:4860::8888", False),
    ("::ffff:10.0.0.1", True), ("::ffff:8.8.8.8", False),  # IPv4-mapped
    ("2002:a00:1::", True), ("2002:808:808::", False),  # 6to4
    ("64:ff9b::a00:1", True), ("64:ff9b::a9fe:a9fe", True), ("64:ff9b::808:808", False),  # NAT64
    ("::a00:1", True), ("::6440:1", True), ("::808:808", False),  # IPv4-compatible
    ("64:ff9b:0:0:1::a00:1", False),  # outside 64:ff9b::/96: no IPv4 inside
]


@pytest.mark.parametrize("address, private", ADDRESSES)
def test_is_private_address(address, private):
    assert is_private_address(ipaddress.ip_address(address)) is private


@pytest.mark.parametrize("address, private", ADDRESSES)
def test_literal_addresses_in_urls(address, private):
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:8080/a.jpg"
    assert url_problem(url, allow_private_hosts=False) == ("private_host" if private else None)
    assert url_problem(url, allow_private_hosts=True) is None


@pytest.mark.parametrize("host", [
    "0x7f.0.0.1", "0x7f000001", "0177.0.0.1", "017700000001", "2130706433", "127.1",
    "10.1", "0xa.0.0.1", "012.0.0.1", "3232235777",  # 192.168.1.1 as one decimal number
    "0", "0x0", "0xA9.0xFE.0xA9.0xFE",
])
def test_legacy_ipv4_notations_of_private_addresses_are_private(host):
    assert url_problem(f"http://{host}/a.jpg", allow_private_hosts=False) == "private_host"
    # allowed, they are still not a dotted address img2dataset and the fetcher agree on
    assert url_problem(f"http://{host}/a.jpg", allow_private_hosts=True) == "invalid_url"


@pytest.mark.parametrize("host", ["0x8.8.8.8", "0x08080808", "010.010.010.010", "8.8.2056"])
def test_legacy_ipv4_notations_of_public_addresses_are_invalid(host):
    assert url_problem(f"http://{host}/a.jpg", allow_private_hosts=False) == "invalid_url"


DNS = {
    "public.example": ("8.8.8.8", "2001:4860:4860::8888"),
    "mixed.example": ("8.8.8.8", "10.0.0.7"),  # round-robin with one private answer
    "mixed6.example": ("2001:4860:4860::8888", "fd00::7"),
    "mapped.example": ("8.8.4.4", "::ffff:127.0.0.1"),
    "nat64.example": ("64:ff9b::7f00:1",),
    "gone.example": (),
}


@pytest.fixture
def fake_dns(monkeypatch):
    """The module's resolver seam answers from DNS and records each name it is asked."""
    asked = []

    def fake_resolve(host):
        asked.append(host)
        return tuple(ipaddress.ip_address(a) for a in DNS.get(host, ("8.8.8.8",)))

    monkeypatch.setattr(urls, "resolve", fake_resolve)
    return asked


@pytest.mark.parametrize("name, problem", [
    ("public.example", None), ("mixed.example", "private_host"),
    ("mixed6.example", "private_host"), ("mapped.example", "private_host"),
    ("nat64.example", "private_host"), ("gone.example", None),
])
def test_a_name_with_any_private_address_is_refused(fake_dns, name, problem):
    assert url_problem(f"http://{name}/a.jpg", allow_private_hosts=False) == problem
    assert url_problem(f"https://{name.upper()}.:443/a.jpg", allow_private_hosts=False) == problem
    assert fake_dns == [name, name]  # looked up as the fetcher will: lower-case, no dot
    assert url_problem(f"http://{name}/a.jpg", allow_private_hosts=True) is None
    assert fake_dns == [name, name]  # allowed: no lookup at all


def test_a_batch_looks_up_each_name_once_and_refuses_every_row_of_a_private_one(fake_dns):
    urls_ = ["http://mixed.example/1.jpg", "HTTP://MIXED.example:8080/2.jpg",
             "http://mixed.example/a b.jpg",  # not the common form: checked one by one
             "http://public.example/3.jpg", "http://public.example/ü.jpg",
             "http://mixed6.example/4.jpg", "http://gone.example/5.jpg",
             "http://localhost/6.jpg", "http://a.localhost:1/7.jpg", "http://localhost.example/8"]
    batch = pa.RecordBatch.from_arrays([pa.array(urls_), pa.array(["a cat"] * len(urls_))],
                                       ["url", "caption"])
    with ThreadPoolExecutor(2) as pool:
        _, codes = check_batch(batch, False, pool)
        assert [REASONS[c - 1] if c else None for c in codes] == [
            "private_host"] * 3 + [None, None, "private_host", None] + ["private_host"] * 2 + [None]
        assert sorted(fake_dns) == ["gone.example", "localhost.example", "mixed.example",
                                    "mixed6.example", "public.example"]
        fake_dns.clear()
        _, codes = check_batch(batch, True, pool)
        assert not codes.any() and fake_dns == []


def test_private_names_keeps_the_names_with_a_private_address(fake_dns):
    with ThreadPoolExecutor(2) as pool:
        assert private_names(iter(DNS), pool) == {
            "mixed.example", "mixed6.example", "mapped.example", "nat64.example"}


def test_batch_urls_are_stripped_and_bad_bytes_are_invalid(fake_dns):
    batch = pa.RecordBatch.from_arrays([
        pa.array([b" http://public.example/a.jpg\t", b"http://public.example/\xff.jpg",
                  "\u3000http://public.example/ü.jpg\u3000".encode(), None], pa.binary()),
        pa.array([b"a", b"b", b"c", b"d"], pa.binary()),
        pa.array([1, 2, 3, 4]),
    ], ["u", "c", "key"])
    with ThreadPoolExecutor(1) as pool:
        checked, codes = check_batch(batch, False, pool)
    assert [REASONS[c - 1] if c else None for c in codes] == [
        None, "invalid_url", None, "invalid_url"]
    assert checked.schema.names == ["url", "caption", "key"]
    assert checked.column(0).to_pylist() == [
        "http://public.example/a.jpg", None, "http://public.example/ü.jpg", None]
    assert checked.column(2).to_pylist() == [1, 2, 3, 4]


def test_as_utf8_turns_numbers_into_text_and_marks_only_bad_bytes():
    text, invalid = as_utf8(pa.array([7, None, 12]))
    assert text.type == pa.string() and text.to_pylist() == ["7", None, "12"]
    assert invalid.tolist() == [False] * 3
    text, invalid = as_utf8(pa.array([b"ok", b"\xff", None, b"caf\xc3\xa9"], pa.large_binary()))
    assert text.type == pa.string() and text.to_pylist() == ["ok", None, None, "café"]
    assert invalid.tolist() == [False, True, False, False]


def test_caption_codes_orders_its_reasons():
    captions = pa.array(["a cat", "", None, None])
    assert caption_codes(captions, np.array([False, False, False, True])).tolist() == [
        0, CODE["empty_caption"], CODE["missing_caption"], CODE["non_utf8_caption"]]


def test_file_urls_below_the_image_root_pass_and_nothing_climbs_out(fake_dns):
    root = "file:///data/images/"
    urls_ = [root + "a.jpg", root + "sub/b.jpg", root + "../secret.jpg", root + "sub/../../x",
             "file:///data/imagesX/c.jpg", "file:///etc/passwd", "http://mixed.example/a.jpg"]
    batch = pa.RecordBatch.from_arrays([pa.array(urls_), pa.array(["a cat"] * len(urls_))],
                                       ["url", "caption"])
    with ThreadPoolExecutor(1) as pool:
        _, codes = check_batch(batch, False, pool, image_root=root)
    assert [REASONS[c - 1] if c else None for c in codes] == [
        None, None] + ["bad_scheme"] * 4 + ["private_host"]


def test_an_image_root_does_not_excuse_a_bad_caption(fake_dns):
    batch = pa.RecordBatch.from_arrays([pa.array(["file:///d/a.jpg"] * 2), pa.array(["", "x"])],
                                       ["url", "caption"])
    with ThreadPoolExecutor(1) as pool:
        _, codes = check_batch(batch, False, pool, image_root="file:///d/")
    assert codes.tolist() == [CODE["empty_caption"], 0]


def test_resolve_uncached_answers_addresses_without_zone_and_once_each(monkeypatch):
    infos = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%eth0", 0, 0, 2)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0))]
    calls = []

    def getaddrinfo(host, port, **kwargs):
        calls.append((host, port, kwargs))
        if host == "bad":
            raise socket.gaierror("no such name")
        if host == "idna":
            raise UnicodeError("label too long")
        return infos

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert sorted(urls.resolve_uncached("x"), key=str) == [
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fe80::1")]
    assert calls == [("x", None, {"proto": socket.IPPROTO_TCP})]
    assert urls.resolve_uncached("bad") == () and urls.resolve_uncached("idna") == ()


LONG_HOST = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters, the most DNS allows


@pytest.mark.parametrize("url, problem", [
    ("http://example.com:99999/a.jpg", "invalid_url"),  # a port urlsplit refuses
    ("http://example.com:8x/a.jpg", "invalid_url"),
    (f"http://{LONG_HOST}/a.jpg", None),
    (f"http://{LONG_HOST}b/a.jpg", "invalid_url"),  # 254 characters
    ("http://a@b@[2001:4860:4860::8888]/a.jpg", None),  # the host follows the last "@"
    ("http://user@[2001:4860:4860::8888]:80/a.jpg", None),
    ("http://[2001:4860:4860::8888%25%ff]/a.jpg", "invalid_url"),  # a zone that is not UTF-8
    ("http://localhost/a.jpg", "private_host"),  # refused by name, whatever it resolves to
    ("http://x.LOCALHOST/a.jpg", "private_host"),
    ("http://mixed.example", "private_host"),  # no path
    ("http://localhost", "private_host"),
])
def test_more_url_problems(fake_dns, url, problem):
    assert len(LONG_HOST) == 253
    assert url_problem(url, allow_private_hosts=False) == problem
    batch = pa.RecordBatch.from_arrays([pa.array([url]), pa.array(["a cat"])], ["url", "caption"])
    with ThreadPoolExecutor(1) as pool:
        _, codes = check_batch(batch, False, pool)
    assert codes.tolist() == [CODE[problem] if problem else 0]
    assert "localhost" not in fake_dns  # never looked up


def test_a_batch_whose_only_uncommon_url_is_missing(fake_dns):
    batch = pa.RecordBatch.from_arrays([pa.array(["http://public.example/a.jpg", None]),
                                        pa.array(["a cat", "a dog"])], ["url", "caption"])
    with ThreadPoolExecutor(1) as pool:
        checked, codes = check_batch(batch, False, pool)
    assert codes.tolist() == [0, CODE["invalid_url"]]
    assert checked.column(0).type == pa.string()
    assert checked.column(0).to_pylist() == ["http://public.example/a.jpg", None]


def test_as_utf8_of_only_bad_bytes_is_still_text():
    text, invalid = as_utf8(pa.array([b"\xff", None], pa.binary()))
    assert text.type == pa.string() and text.to_pylist() == [None, None]
    assert invalid.tolist() == [True, False]
