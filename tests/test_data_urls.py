"""Reading and sanitizing URL lists before anything is downloaded."""
from __future__ import annotations

import pandas as pd
import pytest

from vlp.data_prep.urls import read_url_list, sanitize, url_problem


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
    ],
)
def test_url_problem(url, problem):
    assert url_problem(url, allow_private_hosts=False) == problem


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
