"""Evaluation faults at process level: `vlp eval` run as a command on the reference run's real
2-rank ZeRO-3 checkpoints. Bad input ends it with exit status 2 and one error line naming the
problem (no traceback, nothing on stdout); the nightly job records a bad checkpoint and still
evaluates the others. In-process variants of these errors are in tests/test_eval_*.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from train_helpers import REPO

from vlp.pipeline.data.checkpoints import STATE_FILE, describe_files

pytestmark = pytest.mark.slow

VLP = shutil.which("vlp")


def vlp(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [VLP] if VLP else [sys.executable, "-m", "vlp.pipeline.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def error_line(done: subprocess.CompletedProcess, command: str) -> str:
    """The single error line of a refused `vlp eval` command."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlp eval {command}: error: ")
    print(last)
    return last


def other_config_tag(tag_dir, dest):
    """A copy of a training tag whose config.json describes a deeper model than its weights, its
    checksum recorded again in vlp_state.json: a consistent tag whose config does not fit."""
    shutil.copytree(tag_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    assert config["depth"] == 2  # tests/train_helpers.SMALL_MODEL
    (dest / "config.json").write_text(json.dumps({**config, "depth": 3}, indent=1))
    state = json.loads((dest / STATE_FILE).read_text())
    state["files"].update(describe_files(dest, ["config.json"]))
    (dest / STATE_FILE).write_text(json.dumps(state))
    return dest


@pytest.fixture(scope="module")
def retrieval_copy(world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval") / "retrieval"
    shutil.copytree(world_dir / "retrieval", root)
    return root


def test_missing_image_is_one_clear_line(reference_run, retrieval_copy):
    data = json.loads((retrieval_copy / "dataset_synth.json").read_text())
    image = data["images"][5]
    (retrieval_copy / image["filepath"] / image["filename"]).unlink()
    done = vlp("eval", "retrieval", "--checkpoint", reference_run.run_dir / "checkpoints",
               "--karpathy-json", retrieval_copy / "dataset_synth.json",
               "--image-root", retrieval_copy)
    line = error_line(done, "retrieval")
    assert "1 image file(s) missing" in line and image["filename"] in line


def test_malformed_json_is_one_clear_line(reference_run, retrieval_copy, tmp_path):
    broken = tmp_path / "dataset_synth.json"
    broken.write_text('{"images": [{"filename": "a.jpg", ')
    done = vlp("eval", "retrieval", "--checkpoint", reference_run.run_dir / "checkpoints",
               "--karpathy-json", broken, "--image-root", retrieval_copy)
    line = error_line(done, "retrieval")
    assert f"{broken} is not valid JSON" in line


def test_checkpoint_of_another_config_is_one_clear_line(reference_run, world_dir, tmp_path):
    tag = other_config_tag(reference_run.run_dir / "checkpoints/global_step3",
                           tmp_path / "checkpoints/global_step3")
    done = vlp("eval", "retrieval", "--checkpoint", tag,
               "--karpathy-json", world_dir / "retrieval/dataset_synth.json",
               "--image-root", world_dir / "retrieval")
    line = error_line(done, "retrieval")
    assert f"weights in {tag} do not fit its config.json" in line


def test_nightly_records_the_bad_checkpoint_and_evaluates_the_others(reference_run, world_dir,
                                                                     tmp_path):
    run = tmp_path / "runs/fault"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run.run_dir / "checkpoints/global_step3",
                    run / "checkpoints/global_step3")
    other_config_tag(reference_run.run_dir / "checkpoints/global_step6",
                     run / "checkpoints/global_step6")
    (run / "checkpoints/latest").write_text("global_step6")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"synth_retrieval:\n  task: retrieval\n"
                     f"  karpathy_json: {world_dir / 'retrieval/dataset_synth.json'}\n"
                     f"  image_root: {world_dir / 'retrieval'}\n")
    done = vlp("eval", "nightly", "--runs", tmp_path / "runs", "--suite", suite,
               "--out", tmp_path / "nightly")
    assert done.returncode == 1, done.stderr[-3000:]  # 1: a checkpoint failed in this run
    summary = json.loads(done.stdout)  # stdout holds the summary JSON and nothing else
    assert summary["checkpoints_evaluated"] == 2
    [failure] = summary["failures"]
    assert failure["tag"] == "global_step6" and "do not fit its config.json" in failure["error"]

    results = pd.read_parquet(tmp_path / "nightly/results.parquet")
    ok = results[results["status"] == "ok"]
    assert set(ok["tag"]) == {"global_step3"} and len(ok) == 7  # 6 recalls + mean recall
    assert (ok["step"] == 3).all()
    failed = results[results["status"] == "failed"]
    assert list(failed["tag"]) == ["global_step6"]
    assert (tmp_path / "nightly/report.html").exists()
    assert (run / "eval/global_step3/synth_retrieval.json").exists()
