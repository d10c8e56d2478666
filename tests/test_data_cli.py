"""`vlp data synth|serve|index` end to end, and the loopback server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pandas as pd
import pytest

from vlp.data_prep.server import serve_world


def test_synth_then_index_print_their_summaries(tmp_path, capsys, vlp_data):
    vlp_data("synth", "--out", tmp_path / "world", "--train", 8, "--test", 4, "--seed", 1)
    assert "train: 8" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "world/train/url_list.parquet")) == 8

    assert vlp_data("index", tmp_path / "world") == 2  # no shards there: nothing to index
    assert "vlp data index: error: no *.tar shards in" in capsys.readouterr().err


def test_bad_arguments_end_with_a_one_line_error(tmp_path, capsys, vlp_data):
    code = vlp_data("reshard", "--in", tmp_path / "none", "--out", tmp_path,
                    "--samples-per-shard", 5)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vlp data reshard: error: shard directory") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_serve_world_serves_the_files_at_the_recorded_url(world_dir):
    world = json.loads((world_dir / "world.json").read_text())
    with serve_world(world_dir) as base_url:
        assert base_url == world["base_url"]
        with urllib.request.urlopen(f"{base_url}/train/images/000000.jpg") as response:
            assert response.read() == (world_dir / "train/images/000000.jpg").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base_url}/train/images/nope.jpg")


def test_vlp_data_serve_runs_until_interrupted(world_dir):
    world = json.loads((world_dir / "world.json").read_text())
    # `vlp data serve WORLD` with only the data stage registered (as the vlp_data fixture does).
    code = (
        "import argparse, sys; from vlp.data_prep.cli import register; "
        "p = argparse.ArgumentParser(); register(p.add_subparsers(required=True)); "
        "args = p.parse_args(sys.argv[1:]); sys.exit(args.func(args))"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, "data", "serve", str(world_dir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Ctrl-C reaches it even when this suite runs as a background job, whose children a
        # shell starts with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as server:  # fmt: skip
        try:
            first_line = server.stdout.readline()
            assert first_line.startswith(f"serving {world_dir} at {world['base_url']}")
            with urllib.request.urlopen(f"{world['base_url']}/world.json") as response:
                assert json.loads(response.read()) == world
        finally:
            server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
