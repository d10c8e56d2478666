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
@pytest.mark.parametrize("command", [["eval", "retrieval", "--karpathy-json", "x.json",
                                      "--image-root", "."],
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


@pytest.mark.parametrize("name, content", [
    ("urls.parquet", "url,caption\nhttp://example.com/a.jpg,a cat\n"),  # text named .parquet
    ("urls.csv", 'url,caption\n"http://example.com/a.jpg,a cat\n'),  # an unclosed quote
])
def test_a_url_list_that_cannot_be_parsed_is_one_line(capsys, tmp_path, name, content):
    """pyarrow's ArrowInvalid came out as a traceback."""
    (tmp_path / name).write_text(content)
    code, err = run(capsys, "data", "download", "--url-list", tmp_path / name,
                    "--out", tmp_path / "shards")
    assert_one_line_error(code, err, "data download",
                          f"URL list {tmp_path / name} cannot be read as {name.split('.')[1]}: ")
    assert not (tmp_path / "shards").exists()


def assert_argparse_error(capsys, argv: list, command: str, message: str) -> None:
    """argparse's refusal while parsing: its usage, then one line naming the argument; exit 2."""
    with pytest.raises(SystemExit) as exited:
        vlp([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"vlp {command}: error: {message}", err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got '0'"),
    ("--chunk", "0", "argument --chunk: must be an integer >= 1, got '0'"),
    ("--rerank-k", "-5", "argument --rerank-k: must be an integer >= 0, got '-5'"),
    ("--out", "{tmp}", "argument --out: {tmp} is a directory; name the file to write, e.g. "
                       "{tmp}/result.json"),
])
def test_bad_eval_numbers_and_outputs_are_refused_before_anything_loads(capsys, tmp_path, flag,
                                                                        value, message):
    """--batch-size 0 and --chunk 0 were range() tracebacks after the model had encoded the set,
    --rerank-k -5 was taken for 0, and an --out directory lost the finished result."""
    argv = ["eval", "retrieval", "--checkpoint", tmp_path / "none", "--karpathy-json",
            tmp_path / "none.json", "--image-root", tmp_path, flag, value.format(tmp=tmp_path)]
    assert_argparse_error(capsys, argv, "eval retrieval", message.format(tmp=tmp_path))


@pytest.mark.parametrize("command", [
    ["eval", "vqa", "--out"],
    ["eval", "vqa", "--results"],
    ["eval", "caption", "--karpathy-json", "k", "--image-root", "r", "--out"],
    ["eval", "zeroshot", "--dataset", "d", "--out"],
    ["eval", "linear-probe", "--dataset", "d", "--out"],
    ["eval", "compositionality", "--edits", "e", "--image-root", "r", "--out"],
])
def test_every_eval_job_refuses_an_output_directory(capsys, tmp_path, command):
    argv = [*command, tmp_path, "--checkpoint", tmp_path / "none"]
    assert_argparse_error(capsys, argv, " ".join(command[:2]),
                          f"argument {command[-1]}: {tmp_path} is a directory; name the file to "
                          f"write, e.g. {tmp_path}/result.json")


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device bogus is not a device; use cpu, cuda or cuda:N"),
    ("meta", "--device meta: evaluation runs on cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99: "),  # no CUDA here, or not that many GPUs
])
def test_an_unknown_device_is_one_line(capsys, tmp_path, device, message):
    """--device bogus was torch's RuntimeError after the test set had been read."""
    code, err = run(capsys, "eval", "retrieval", "--checkpoint", tmp_path / "none",
                    "--karpathy-json", tmp_path / "none.json", "--image-root", tmp_path,
                    "--device", device)
    assert_one_line_error(code, err, "eval retrieval", message)


def test_a_failed_stage_is_one_line_with_exit_status_1(capsys):
    """The quickstart's training or evaluation failing: the same line as bad input, status 1."""
    from argparse import Namespace

    from vlp.pipeline.cli import run_command
    from vlp.pipeline.data.errors import StageFailed

    def fail(args):
        raise StageFailed("training failed with exit code 3\nsee the output above")

    assert run_command(Namespace(command="quickstart", func=fail)) == 1
    assert capsys.readouterr().err == ("vlp quickstart: error: training failed with exit code "
                                       "3; see the output above\n")
