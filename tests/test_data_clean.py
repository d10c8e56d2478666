"""URL lists of many parts, in LAION's layout, sanitised and de-duplicated part by part."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlp.data_prep.clean import REFUSED_DIR, WORK_DIR, clean_url_list, cross_part_repeats
from vlp.data_prep.url_lists import find_columns, list_parts
from vlp.pipeline.data.errors import UserError


def _url(i: int) -> str:
    return f"http://img{i % 7}.example.com/{i}.jpg"


@pytest.fixture
def laion_parts(tmp_path):
    """Three parts in three formats with LAION's column names: 0-9, 5-14 and 10-19 (repeats
    across parts), a repeat inside part 0, and one refused row of each kind."""
    folder = tmp_path / "laion"
    folder.mkdir()
    rows = lambda ids: pd.DataFrame({"URL": [_url(i) for i in ids],  # noqa: E731
                                     "TEXT": [f"caption {i}" for i in ids], "NSFW": "UNLIKELY"})
    pd.concat([rows(range(10)), rows([3])]).to_parquet(folder / "part-0.parquet")
    rows(range(5, 15)).to_csv(folder / "part-1.csv", index=False)
    rows(range(10, 20)).to_json(folder / "part-2.jsonl", orient="records", lines=True)
    with open(folder / "part-1.csv", "ab") as f:
        f.write(b"file:///etc/passwd,secrets,UNLIKELY\n"
                b"http://10.0.0.1/a.jpg,an intranet image,UNLIKELY\n"
                b"http://exa%20mple.com/a.jpg,a bad host,UNLIKELY\n"
                b"http://img1.example.com/ok.jpg,,UNLIKELY\n"
                b"http://img1.example.com/latin.jpg,caf\xe9,UNLIKELY\n"
                b"http://img1.example.com/\xff.jpg,bytes that are no text,UNLIKELY\n")
    (folder / "notes.txt").write_text("not a part")
    return folder


def _kept(out):
    parts = sorted((out / WORK_DIR / "parts").glob("*.parquet"))
    return [pd.read_parquet(p).to_dict("list") for p in parts]


@pytest.mark.parametrize("processes", [1, 2])
def test_parts_are_cleaned_and_each_url_kept_once_in_part_order(laion_parts, tmp_path,
                                                                 processes):
    parts = list_parts(laion_parts)
    assert [p.name for p in parts] == ["part-0.parquet", "part-1.csv", "part-2.jsonl"]
    columns = find_columns(parts[0], None, None, ("NSFW",))
    report = clean_url_list(parts, columns, tmp_path / "out", allow_private_hosts=False,
                            processes=processes)
    assert report["rows"] == 11 + 16 + 10 and report["kept"] == 20
    assert report["dropped"] == {"invalid_url": 2, "bad_scheme": 1, "private_host": 1,
                                 "empty_caption": 1, "non_utf8_caption": 1, "duplicate_url": 11}
    kept = _kept(tmp_path / "out")
    assert [k["url"] for k in kept] == [[_url(i) for i in r]
                                        for r in (range(10), range(10, 15), range(15, 20))]
    assert kept[1]["caption"][0] == "caption 10" and set(kept[2]["NSFW"]) == {"UNLIKELY"}
    refused = tmp_path / "out" / REFUSED_DIR
    counts = json.loads((refused / "refused_urls.json").read_text())
    assert counts == {k: report[k] for k in ("rows", "kept", "dropped")}
    sample = pd.read_parquet(refused / "part-00001.parquet")
    assert sample.query("reason == 'bad_scheme'").url.tolist() == ["file:///etc/passwd"]
    assert sample.query("reason == 'invalid_url'").url.tolist() == [
        "http://exa%20mple.com/a.jpg", "http://img1.example.com/\ufffd.jpg"]


def test_the_cleaned_parts_do_not_depend_on_workers_or_batches(laion_parts, tmp_path,
                                                               monkeypatch):
    """The fingerprint a resume compares is the same for 1 or 2 workers and 3-row batches."""
    from vlp.data_prep import url_lists

    parts = list_parts(str(laion_parts / "part-*"))
    columns = find_columns(parts[0], None, None)
    one, two = (clean_url_list(parts, columns, tmp_path / f"out{n}", False, processes=n)
                for n in (1, 2))
    monkeypatch.setattr(url_lists, "BATCH_ROWS", 3)
    small_batches = clean_url_list(parts, columns, tmp_path / "out3", False)
    assert one["rows_sha256"] == two["rows_sha256"] == small_batches["rows_sha256"]
    assert _kept(tmp_path / "out1") == _kept(tmp_path / "out2") == _kept(tmp_path / "out3")


def test_cross_part_merge_walks_the_hash_space_in_ranges(tmp_path):
    """Tiny ranges (merge_rows=3) find the same repeats as one range holding everything."""
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**64 - 1, 50, dtype=np.uint64)
    files = []
    for i in range(4):
        files.append(tmp_path / f"part-{i}.npy")
        np.save(files[-1], np.unique(rng.choice(pool, 20)))
    expected = {}
    for i, path in enumerate(files):
        earlier = np.concatenate([np.load(f) for f in files[:i]] + [np.empty(0, np.uint64)])
        repeats = np.intersect1d(np.load(path), earlier)
        if len(repeats):
            expected[i] = repeats
    for merge_rows in (3, 10**6):
        found = cross_part_repeats(files, merge_rows)
        assert {i: np.sort(h).tolist() for i, h in found.items()} == {
            i: h.tolist() for i, h in expected.items()}


def test_a_part_is_read_in_batches(tmp_path, monkeypatch):
    """Memory follows the batch, not the part: a part of 5 row groups is read as 5 batches."""
    from vlp.data_prep import url_lists

    path = tmp_path / "big.parquet"
    frame = pd.DataFrame({"url": [_url(i) for i in range(50)], "caption": "a cat"})
    frame.to_parquet(path, row_group_size=10)
    monkeypatch.setattr(url_lists, "BATCH_ROWS", 10)
    columns = find_columns(path, None, None)
    assert [b.num_rows for b in url_lists.iter_batches(path, columns)] == [10] * 5
    assert pq.ParquetFile(path).metadata.num_row_groups == 5


def test_inputs_that_are_not_url_lists_are_refused(tmp_path, laion_parts):
    with pytest.raises(UserError, match="not found"):
        list_parts(tmp_path / "missing")
    with pytest.raises(UserError, match=r"no part in the formats \['tsv'\]"):
        list_parts(laion_parts, "tsv")
    (tmp_path / "fake.parquet").write_text("url,caption\n")
    with pytest.raises(UserError, match="cannot be read as parquet"):
        find_columns(tmp_path / "fake.parquet", None, None)
    with pytest.raises(UserError, match=r"no column \['LICENSE'\] to save"):
        find_columns(laion_parts / "part-0.parquet", None, None, ("LICENSE",))
