"""Result files are written whole or not at all, with the mode a plain open would give them."""
from __future__ import annotations

import json
import os
import stat

import pytest

from vlp.pipeline.bench.common import write_json
from vlp.pipeline.data.files import atomic_path, remove_temp_files, write_json_atomic


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_atomic_files_take_the_umask_mode_not_mkstemps_private_one(tmp_path, umask_027):
    write_json_atomic(tmp_path / "result.json", {"a": 1})
    write_json(tmp_path / "bench.json", {"b": 2})  # the benchmarks write through the same path
    for name in ("result.json", "bench.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    assert json.loads((tmp_path / "bench.json").read_text()) == {"b": 2}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-way")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_remove_temp_files_clears_only_atomic_leftovers(tmp_path):
    left = tmp_path / ".result.json.ab12cd34.tmp"
    left.write_text("x")
    kept = tmp_path / "notes.tmp"
    kept.write_text("mine")
    assert remove_temp_files(tmp_path) == [left]
    assert sorted(tmp_path.iterdir()) == [kept]
