"""Reading and sanitizing URL lists before anything is downloaded."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from vlp.data_prep.urls import REASONS, check_batch, resolve, url_problem

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
