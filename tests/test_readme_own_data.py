"""The README's "Your own data, small" walkthrough runs as shown, top to bottom.

The reader's own data is stood in for by 144 rendered images of the synthetic world with their
captions, laid out as the section describes (mydata/images/, train.csv and test.csv with the
header and URLs of its ```csv block). Every command of its ```bash blocks then runs unchanged,
except that the server listens on a free port instead of the default one the URLs name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_cli_readme import (
    OWN_DATA_SECTION,
    Background,
    readme_commands,
    run_readme_commands,
    vlp_env,
)

from vlp.data_prep.synth import generate_world
from vlp.pipeline.distributed import free_port

pytestmark = pytest.mark.slow
TRAIN_PAIRS, TEST_PAIRS = 128, 16  # the counts the section's shard range and prose assume
SERVE = "vlp data serve mydata"


def own_data(work: Path, port: int) -> None:
    """mydata/ as the section lays it out, its URLs on `port` instead of the one shown."""
    (block,) = re.findall(r"```csv\n(.*?)```", OWN_DATA_SECTION, re.S)
    header, example = block.splitlines()[:2]
    folder_url = example.split(",", 1)[0].rsplit("/", 1)[0]  # http://127.0.0.1:PORT/images
    folder_url = re.sub(r":\d+/", f":{port}/", folder_url)
    world = work / "world"
    files = generate_world(world, TRAIN_PAIRS + TEST_PAIRS, 2, seed=0)["files"]
    rows = pd.read_parquet(world / files["train_url_list"])
    shutil.copytree(world / files["train_images"], work / "mydata/images")
    rows["url"] = [f"{folder_url}/{url.rsplit('/', 1)[1]}" for url in rows["url"]]
    assert header.split(",") == list(rows.columns)
    rows[:TRAIN_PAIRS].to_csv(work / "mydata/train.csv", index=False)
    rows[TRAIN_PAIRS:].to_csv(work / "mydata/test.csv", index=False)


def test_the_own_data_walkthrough_runs_as_shown(tmp_path):
    shown = readme_commands(OWN_DATA_SECTION)
    assert shown[0] == SERVE and len(shown) == 6
    work, port = tmp_path / "work", free_port()
    own_data(work, port)
    moved = {SERVE: Background(f"{SERVE} --port {{port}}", ready="/train.csv")}
    outputs = run_readme_commands(shown, moved, work, vlp_env(tmp_path), port, tmp_path)

    download, test_download, tokenizer, train, evaluate = (outputs[c] for c in shown[1:])
    assert "total_shards: 8" in download and "warning" not in download
    assert "warning: mytest holds 1 shard(s)" in test_download
    assert "warning: the tokenizer has" in tokenizer
    assert re.search(r"^MFU peak: \S+ TFLOP/s per device \(measured", train, re.M)
    result = json.loads((work / "runs/mine/retrieval.json").read_text())
    assert (result["step"], result["num_images"]) == (30, TEST_PAIRS)
    assert set(result["metrics"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@1"}
