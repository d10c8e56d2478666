"""`vlp train` checks the whole run in the parent before launching: one error line, exit 2."""
from __future__ import annotations

import re
import shlex

import pytest
import torch
from train_helpers import train_overrides

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.train.config import list_keys
from vlp.pipeline.train.launch import launcher_command


# Without a hostfile the ranks are --nproc (or 2) on a CPU node, bounded by the GPUs on a GPU node.
CPU_NODE = pytest.mark.skipif(torch.cuda.is_available(), reason="--nproc is bounded by the GPUs")


def train(capsys, *argv: str) -> tuple[int, str, str]:
    code = vlp(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def good(tmp_path, shard_dir, tokenizer_dir):
    """Overrides of a valid run on the 5 session shards (1 loader worker per rank)."""
    return train_overrides(tmp_path / "run", shard_dir, tokenizer_dir)


@CPU_NODE
def test_dry_run_validates_then_prints_the_launch_command(capsys, good, tmp_path):
    code, out, err = train(capsys, "--dry-run", "--nproc", 2, "--set", *good)
    assert code == 0, err
    assert out.count("\n") == 1  # the command alone on stdout, quoted for a shell
    port = int(re.search(r"^rendezvous on port (\d+) \(free port picked\)$", err, re.M)[1])
    assert shlex.split(out) == launcher_command(None, good, nproc=2, master_port=port)
    assert "--num_accelerators 2 --module vlp.pipeline.train" in out
    assert "valid for 2 ranks" in err
    assert not (tmp_path / "run").exists()  # nothing was started or written


@pytest.mark.parametrize("extra,message", [
    (["--set", "optim.lr=abc"], "config key optim.lr: 'abc' is not a valid float"),
    (["--set", "optim.lr=0"], "optim.lr must be > 0"),
    (["--set", "optim.lrr=1"], "unknown config key(s) optim.lrr"),
    (["--recipe", "nope.yaml"], "recipe nope.yaml not found"),
    (["--set", "data.tokenizer=/nonexistent/tok"], "data.tokenizer: no tokenizer at"),
    (["--set", f"data.tokenizer={__file__}"], f"data.tokenizer: {__file__} is not a tokenizer"),
    (["--set", "model.overrides={image_size: 262144}"],
     "model: image_size must be at most 8192, got 262144"),  # passed, then failed on every rank
    (["--set", "model.init_from=/nonexistent/export"], "model.init_from: checkpoint not found"),
    (["--set", "model.init_image_from=/nonexistent/vit"],
     "model.init_text_from / init_image_from: /nonexistent/vit has no config.json"),
    (["--set", "ds_config=nope.json"], "ds_config nope.json: no such file"),
    (["--set", "checkpoint.resume=latest"], "checkpoint.resume=latest but"),
    pytest.param(["--nproc", 8], "5 shards cannot feed 8 ranks x 1 workers", marks=CPU_NODE),
    (["--nproc", 0], "--nproc must be >= 1"),
    (["--master-addr", "10.0.0.1"], "--master-addr needs --hostfile"),
    (["--node-rank", 1], "--node-rank needs --hostfile"),
    (["--max-restarts", -1], "--max-restarts must be >= 0, got -1"),
    (["--set", "step_timeout_s=400"], "step_timeout_s must be in [1, dist_timeout_s=60] or null"),
    (["--set", "data.read_concurrency=0"], "data.read_concurrency must be in [1, 64], got 0"),
])
def test_bad_runs_end_with_one_line_before_any_launch(capsys, good, extra, message):
    argv = [*extra[:-1], *good, extra[-1]] if extra[0] == "--set" else [*extra, "--set", *good]
    code, out, err = train(capsys, "--dry-run", *argv)
    assert code == 2 and out == ""
    assert err.startswith("vlp train: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_wildcard_and_directory_shard_patterns_explain_brace_patterns(capsys, good, shard_dir):
    for shards in (f"{shard_dir}/*.tar", str(shard_dir)):
        code, _, err = train(capsys, "--dry-run", "--set", *good, f"data.shards={shards}")
        assert code == 2 and "brace pattern such as 'shards/{00000..00011}.tar'" in err, err


def test_the_hostfile_sets_the_world_the_shards_must_feed(capsys, good, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=3\nnode-b slots=2  # five ranks\n")
    launch = ["--dry-run", "--hostfile", hostfile, "--master-addr", "10.0.0.1"]
    code, out, err = train(capsys, *launch, "--set", *good)
    assert code == 0 and "valid for 5 ranks" in err and f"--hostfile {hostfile}" in out, err
    hostfile.write_text("node-a slots=3\nnode-b slots=3\n")  # 6 ranks, 5 shards
    code, _, err = train(capsys, *launch, "--set", *good)
    assert code == 2 and "5 shards cannot feed 6 ranks" in err


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("node-a 8\n", "line 1: 'node-a 8' is not 'HOST slots=N'"),
    ("node-a slots=2\nnode-a slots=2\n", "line 2"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfiles_are_refused(capsys, good, tmp_path, content, message):
    hostfile = tmp_path / "hostfile"
    if content is not None:
        hostfile.write_text(content)
    code, _, err = train(capsys, "--dry-run", "--hostfile", hostfile, "--set", *good)
    assert code == 2 and message in err, err


def test_nproc_with_a_hostfile_is_refused(capsys, good, tmp_path):
    (tmp_path / "hostfile").write_text("node-a slots=2\n")
    code, _, err = train(capsys, "--dry-run", "--hostfile", tmp_path / "hostfile", "--nproc", 2,
                         "--set", *good)
    assert code == 2 and "--nproc applies without --hostfile only" in err


def test_list_keys_prints_every_key_with_type_default_and_doc(capsys):
    code, out, _ = train(capsys, "--list-keys")
    keys = list_keys()
    assert code == 0 and len(keys) > 40
    lines = out.splitlines()
    assert len(lines) == 2 * len(keys)
    assert "optim.lr (float, default 0.001)" in lines
    assert lines[lines.index("optim.lr (float, default 0.001)") + 1] == \
        "    Peak learning rate (AdamW)."
    assert "data.shards (str, default '')" in lines


def test_train_help_says_where_the_keys_are_listed(capsys):
    with pytest.raises(SystemExit):
        vlp(["train", "--help"])
    assert "--list-keys" in capsys.readouterr().out
