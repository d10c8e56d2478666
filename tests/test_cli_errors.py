"""Bad input to any `vlp` command: one line, `vlp <command>: error: ...`, on stderr, exit 2,
before any slow work (eval reads its data before it loads a model)."""
from __future__ import annotations

import pytest
import torch

from vlp.pipeline.cli import main as vlp


def run(capsys, *argv) -> tuple[int, str]:
    code = vlp([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert out == "" or code == 0, out  # errors never go to stdout
    return code, err


def assert_one_line_error(code: int, err: str, command: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith(f"vlp {command}: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("argv,command,message", [
    (["data", "index", "{file}"], "data index", "notes.txt is a file, not a directory"),
    (["data", "index", "{tmp}"], "data index", "no *.tar shards in"),
    (["data", "tokenizer", "--shard-dir", "{file}", "--out", "{tmp}/t", "--vocab-size", 100],
     "data tokenizer", "is a file, not a directory"),
    (["data", "reshard", "--in", "{file}", "--out", "{tmp}/o", "--samples-per-shard", 5],
     "data reshard", "is a file, not a directory"),
    (["export", "--checkpoint", "{tmp}/none", "--out", "{tmp}/e"], "export",
     "checkpoint not found"),
    (["export", "--checkpoint", "{file}", "--out", "{tmp}/e"], "export", "(it is a file)"),
    (["eval", "vqa", "--checkpoint", "{tmp}/none"], "eval vqa",
     "give --vqa-dir, or both --train-questions and --train-annotations"),
    (["eval", "vqa", "--checkpoint", "{tmp}/none", "--vqa-dir", "{tmp}/none"], "eval vqa",
     "--vqa-dir"),
    (["eval", "retrieval", "--checkpoint", "{tmp}/none", "--karpathy-json", "{file}"],
     "eval retrieval", "--karpathy-json needs --image-root"),
    (["eval", "retrieval", "--checkpoint", "{tmp}/none", "--karpathy-json", "{tmp}/none.json",
      "--image-root", "{tmp}"], "eval retrieval", "Karpathy split JSON not found"),
])
def test_bad_paths_and_flags_are_one_line_errors(capsys, tmp_path, a_file, argv, command,
                                                 message):
    argv = [str(a).format(file=a_file, tmp=tmp_path) for a in argv]
    assert_one_line_error(*run(capsys, *argv), command, message)


def test_eval_names_the_missing_data_flag_not_the_missing_checkpoint(capsys, tmp_path):
    """The data is checked first: a wrong --vqa-dir is reported even with a wrong checkpoint."""
    code, err = run(capsys, "eval", "vqa", "--checkpoint", tmp_path / "none",
                    "--vqa-dir", tmp_path / "vqa")
    assert_one_line_error(code, err, "eval vqa", f"--vqa-dir {tmp_path / 'vqa'} does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["eval", "retrieval", "--karpathy-json", "x.json"],
                                     ["eval", "nightly", "--runs", "runs"]])
def test_device_cuda_without_cuda_is_refused(capsys, tmp_path, command):
    extra = ["--checkpoint", tmp_path] if command[1] == "retrieval" else []
    code, err = run(capsys, *command, *extra, "--device", "cuda")
    assert_one_line_error(code, err, " ".join(command[:2]), "--device cuda: no CUDA device")


def test_private_hosts_are_refused_with_the_flag_that_allows_them(capsys, tmp_path, world_dir):
    code, err = run(capsys, "data", "download", "--url-list",
                    world_dir / "train/url_list.parquet", "--out", tmp_path / "shards")
    assert_one_line_error(code, err, "data download", "private_host")
    assert "unless --allow-private-hosts is given" in err
    assert not (tmp_path / "shards").exists()
