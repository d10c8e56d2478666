"""Reading and sanitizing URL lists before anything is downloaded."""
from __future__ import annotations

import socket

import pandas as pd
import pytest

from vlp.data_prep.urls import read_url_list, resolve, sanitize, url_problem


@pytest.mark.parametrize(
    "url, problem",
    [
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
    ],
)
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


def test_sanitize_counts_every_dropped_row(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(
        b"url,caption\n"
        b"http://example.com/1.jpg,a red circle\n"
        b"http://example.com/2.jpg,\n"
        b"http://example.com/3.jpg,caf\xe9 au lait\n"  # latin-1, not UTF-8
        b"file:///etc/passwd,secrets\n"
        b"http://10.1.2.3/4.jpg,an intranet image\n"
        b"http://example.com/5.jpg,  a blue square  \n"
    )
    clean, report = sanitize(read_url_list(path), allow_private_hosts=False)
    assert clean.to_dict("list") == {
        "url": ["http://example.com/1.jpg", "http://example.com/5.jpg"],
        "caption": ["a red circle", "a blue square"],
    }
    assert report["rows"] == 6 and report["kept"] == 2
    assert report["dropped"] == {
        "empty_caption": 1,
        "non_utf8_caption": 1,
        "bad_scheme": 1,
        "private_host": 1,
    }
    assert report["examples"]["bad_scheme"] == ["'file:///etc/passwd'"]


def test_a_missing_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://example.com/1.jpg"], "text": ["a cat"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"no column 'caption'.*--caption-col"):
        read_url_list(path)
    assert read_url_list(path, caption_col="text").num_rows == 1


def test_unknown_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported format"):
        read_url_list(tmp_path / "urls.xlsx")
