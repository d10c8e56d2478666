"""Checkpoint publishing and validation, on tag directories laid out as training writes them."""
import errno
import fractions
import json
import logging
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from train_helpers import REPO, SHARDS, make_tag

from vlp.pipeline.data.checkpoints import (
    CheckpointError,
    complete_tags,
    resolve_resume,
    validate_tag,
    weights_only_loads,
)
from vlp.pipeline.data.model_loading import _consolidate_zero, resolve_checkpoint
from vlp.pipeline.eval.nightly.runner import discover_checkpoints
from vlp.pipeline.train.checkpointer import clear_checkpoints, prune_checkpoints

def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert resolve_resume(tmp_path / "checkpoints", "auto") is None
    assert resolve_resume(tmp_path / "checkpoints", "none") is None
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(tmp_path / "checkpoints", "latest")


def test_latest_names_the_newest_tag(tmp_path):
    make_tag(tmp_path, 10)
    newest = make_tag(tmp_path, 20)
    assert resolve_resume(tmp_path, "auto") == newest
    assert resolve_resume(tmp_path, "latest") == newest


def test_truncated_latest_is_refused_and_latest_valid_falls_back(tmp_path):
    good = make_tag(tmp_path, 10)
    bad = make_tag(tmp_path, 20)
    shard = bad / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:50])
    assert any("truncated" in p for p in validate_tag(bad))
    with pytest.raises(CheckpointError, match="latest-valid"):
        resolve_resume(tmp_path, "latest")
    assert resolve_resume(tmp_path, "latest-valid") == good


def test_corruption_that_keeps_the_size_is_caught_by_the_checksum(tmp_path):
    """Sizes alone passed a garbage block of the right length to DeepSpeed (a traceback), and
    latest-valid could not skip it."""
    good = make_tag(tmp_path, 10)
    bad = make_tag(tmp_path, 20)
    shard = bad / SHARDS[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    shard.write_bytes(bytes(data))
    assert validate_tag(good) == []
    assert validate_tag(bad) == [f"{shard} has the recorded size but not the recorded sha256 "
                                 "(corrupted)"]
    with pytest.raises(CheckpointError, match="not the recorded sha256"):
        resolve_resume(tmp_path, "latest")
    assert resolve_resume(tmp_path, "latest-valid") == good
    # Ranks share the hashing: the parts of 2 ranks together find what one finds.
    parts = [validate_tag(bad, part=(rank, 2)) for rank in (0, 1)]
    assert sorted(parts, key=len) == [[], validate_tag(bad)]


def test_tags_without_checksums_are_still_checked_by_size(tmp_path):
    tag = make_tag(tmp_path, 10)
    state = json.loads((tag / "vlp_state.json").read_text())
    state["files"] = {name: record["bytes"] for name, record in state["files"].items()}
    (tag / "vlp_state.json").write_text(json.dumps(state))  # a tag saved before checksums
    assert validate_tag(tag) == []
    (tag / SHARDS[2]).write_bytes(b"x")
    assert "expected" in validate_tag(tag)[0]


def test_partial_tags_are_never_candidates_and_are_pruned(tmp_path):
    good = make_tag(tmp_path, 10)
    partial = tmp_path / "global_step20.partial"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    unfinished = tmp_path / "global_step30"  # renamed but no state file: not complete
    unfinished.mkdir()
    universal = tmp_path / "global_step10.universal"  # a world-size conversion cut by a crash
    shutil.copytree(good, universal)
    assert complete_tags(tmp_path) == [good]
    assert validate_tag(unfinished)
    prune_checkpoints(tmp_path, keep_last=3)
    assert not partial.exists() and not universal.exists() and good.exists()


def test_overwrite_clears_every_tag_and_copy_but_not_a_users_directory(tmp_path):
    for step in (3, 6):
        make_tag(tmp_path, step)
    (tmp_path / "latest").write_text("global_step6")
    for name in ("global_step9.partial", "global_step6.universal",
                 "global_step6.universal.partial", "global_step6.bak"):
        shutil.copytree(tmp_path / "global_step6", tmp_path / name)
    clear_checkpoints(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["global_step6.bak"]


def test_keep_last_k(tmp_path):
    for step in (5, 10, 15, 20):
        make_tag(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in complete_tags(tmp_path)] == ["global_step15", "global_step20"]


def test_keep_last_0_keeps_every_tag(tmp_path):
    for step in (5, 10, 15):
        make_tag(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=0)
    assert [p.name for p in complete_tags(tmp_path)] == [
        "global_step5", "global_step10", "global_step15"]


def test_clearing_needs_no_latest_file(tmp_path):
    make_tag(tmp_path, 5)
    (tmp_path / "latest").unlink()
    clear_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tag_that_will_not_go_is_renamed_first_and_named_in_a_warning(tmp_path, monkeypatch,
                                                                        caplog):
    make_tag(tmp_path, 5)
    make_tag(tmp_path, 10)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="vlp.pipeline.train.checkpointer"):
        prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "global_step10", "global_step5.deleting", "latest"]
    assert caplog.messages == [f"could not delete old checkpoint {tmp_path / 'global_step5'}: "
                               "[Errno 16] Device or resource busy"]


def test_pruning_never_deletes_the_tag_just_written(tmp_path):
    """An old run's tags 400/500/600 beside a new run's first checkpoint, step 50: pruning by
    step number deleted global_step50 and left `latest` naming a missing directory."""
    for step in (400, 500, 600):
        make_tag(tmp_path, step, published=step)
    new = make_tag(tmp_path, 50, published=1000)
    prune_checkpoints(tmp_path, keep_last=3, current=new)
    assert [p.name for p in complete_tags(tmp_path)] == [
        "global_step50", "global_step500", "global_step600"]  # the oldest published went
    assert (tmp_path / "latest").read_text() == "global_step50"
    prune_checkpoints(tmp_path, keep_last=1)  # `latest` alone protects it too
    assert [p.name for p in complete_tags(tmp_path)] == ["global_step50"]


def test_starting_afresh_over_existing_checkpoints_is_refused_unless_overwriting(tmp_path):
    make_tag(tmp_path, 400)
    with pytest.raises(CheckpointError, match=r"already holds 1 checkpoint.*overwrite=true"):
        resolve_resume(tmp_path, "none")
    assert resolve_resume(tmp_path, "none", overwrite=True) is None


def test_auto_without_latest_resumes_the_newest_valid_tag(tmp_path):
    """A kill between publishing a tag and writing `latest` (or a deleted `latest`) once made
    `auto` start afresh beside the run's own checkpoints."""
    old = make_tag(tmp_path, 3)
    (tmp_path / "latest").unlink()
    assert resolve_resume(tmp_path, "auto") == old


def test_the_corrupt_latest_message_does_not_recommend_starting_over_in_place(tmp_path):
    make_tag(tmp_path, 10)
    bad = make_tag(tmp_path, 20)
    (bad / SHARDS[0]).unlink()
    with pytest.raises(CheckpointError) as raised:
        resolve_resume(tmp_path, "latest")
    assert "checkpoint.resume=latest-valid" in str(raised.value)
    assert "checkpoint.resume=none checkpoint.overwrite=true" in str(raised.value)


def test_a_stray_directory_beside_the_tags_is_ignored(tmp_path):
    """A backup copy `global_step6.bak` made tag parsing raise: pruning failed on rank 0 after
    publishing (the other ranks waiting at the barrier), latest-valid exited with "invalid
    literal for int()", and the nightly job failed for every run."""
    ckpt = tmp_path / "run" / "checkpoints"
    for step in (3, 6):
        make_tag(ckpt, step)
    shutil.copytree(ckpt / "global_step6", ckpt / "global_step6.bak")
    prune_checkpoints(ckpt, keep_last=1)
    assert (ckpt / "global_step6.bak").is_dir() and not (ckpt / "global_step3").exists()
    assert resolve_resume(ckpt, "latest-valid") == ckpt / "global_step6"
    assert [ref.tag for ref in discover_checkpoints(tmp_path)] == ["global_step6"]


def test_unknown_resume_mode(tmp_path):
    with pytest.raises(CheckpointError, match="choose one of"):
        resolve_resume(tmp_path, "newest")


@pytest.mark.parametrize("name", ["/ABS", "../../elsewhere/checkpoints/global_step5", "..", ".",
                                  ""])
def test_latest_must_name_a_directory_of_the_run(tmp_path, name):
    """A `latest` holding an absolute path or climbing with `..` led evaluation (and resume) to a
    checkpoint outside the run."""
    outside = make_tag(tmp_path / "elsewhere" / "checkpoints", 5)
    ckpt = tmp_path / "run" / "checkpoints"
    make_tag(ckpt, 3)
    (ckpt / "latest").write_text(name.replace("/ABS", str(outside)) + "\n")
    message = (f"{ckpt / 'latest'} names {name.replace('/ABS', str(outside))!r}, which is not a "
               f"tag directory in {ckpt}: it must hold a directory name such as global_step120")
    for resolve in (lambda: resolve_checkpoint(ckpt), lambda: resolve_resume(ckpt, "auto")):
        with pytest.raises(CheckpointError) as raised:
            resolve()
        assert str(raised.value) == message
    assert resolve_resume(ckpt, "latest-valid") == ckpt / "global_step3"  # does not read it


@pytest.mark.parametrize("kept", [[], [SHARDS[1], SHARDS[2]]], ids=["empty", "no-model-file"])
def test_a_state_that_lists_no_model_file_is_corrupt(tmp_path, kept):
    """`"files": {}` validated: nothing was checked, and DeepSpeed got a tag without its files."""
    good = make_tag(tmp_path, 10)
    bad = make_tag(tmp_path, 20)
    state = json.loads((bad / "vlp_state.json").read_text())
    state["files"] = {name: state["files"][name] for name in kept}
    (bad / "vlp_state.json").write_text(json.dumps(state))
    assert validate_tag(bad) == [
        f"{bad / 'vlp_state.json'} lists no DeepSpeed model file (*model_states.pt) (corrupt: "
        "saving records every file it wrote)"]
    with pytest.raises(CheckpointError, match="lists no DeepSpeed model file"):
        resolve_resume(tmp_path, "latest")
    assert resolve_resume(tmp_path, "latest-valid") == good


def test_pruning_deletes_only_the_names_a_run_writes(tmp_path):
    """Pruning globbed global_step*.partial and deleted a user's global_step_notes.partial."""
    make_tag(tmp_path, 10)
    users = ["global_step_notes.partial", "global_step.partial", "global_stepX.universal",
             "global_step6.bak", "global_step6.partial.old"]
    ours = ["global_step20.partial", "global_step10.universal", "global_step10.universal.partial",
            "global_step5.deleting"]
    for name in users + ours:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("keep me")
    prune_checkpoints(tmp_path, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["global_step10", "latest", *users])


# Run in a subprocess: an audit hook cannot be removed. It refuses to delete vlp_state.json, as
# NFS refuses a file another client holds open.
PRUNE_REFUSING_STATE_FILES = """
import errno, os, sys
from pathlib import Path
from vlp.pipeline.train.checkpointer import prune_checkpoints

def refuse(event, args):
    if event == "os.remove" and os.fsdecode(args[0]).endswith("vlp_state.json"):
        raise OSError(errno.EBUSY, "Device or resource busy", args[0])

sys.addaudithook(refuse)
prune_checkpoints(Path(sys.argv[1]), keep_last=1)
"""


def test_a_tag_whose_deletion_is_cut_short_is_never_listed(tmp_path):
    """Pruning deleted a tag in place: cut short, it left vlp_state.json beside some of the files,
    and the nightly job (and latest-valid) took the half-deleted tag for complete."""
    ckpt = tmp_path / "run" / "checkpoints"
    make_tag(ckpt, 5)
    newest = make_tag(ckpt, 10)
    done = subprocess.run([sys.executable, "-c", PRUNE_REFUSING_STATE_FILES, str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not delete old checkpoint" in done.stderr
    assert complete_tags(ckpt) == [newest]
    assert [ref.tag for ref in discover_checkpoints(tmp_path)] == ["global_step10"]
    assert (ckpt / "global_step5.deleting" / "vlp_state.json").is_file()
    prune_checkpoints(ckpt, keep_last=1)  # the next save removes the leftover
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step10", "latest"]


def write_pickle(path, data_pkl: bytes) -> None:
    """A torch.save zip file whose pickle is `data_pkl`."""
    torch.save({}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data_pkl if name.endswith("/data.pkl") else data)


@pytest.mark.parametrize("payload,reason", [
    ("global", "its pickle needs fractions.Fraction, which is not allowed"),
    ("opcode", "Unsupported operand 105"),  # INST, which no torch.save writes
])
def test_a_file_refused_by_the_weights_only_loads_is_named_without_torchs_advice(
        tmp_path, payload, reason):
    """A resume failing in DeepSpeed's load printed torch's advice to load the file again with
    weights_only=False, which runs whatever the pickle holds."""
    tag = make_tag(tmp_path, 10)
    shard = tag / SHARDS[0]
    if payload == "global":
        torch.save({"loss_scale": fractions.Fraction(1, 3)}, shard)
    else:
        write_pickle(shard, b"(i__builtin__\nobject\n.")
    message = (f"{shard} could not be loaded safely: {reason} (it is damaged or was not written "
               "by DeepSpeed)")
    with pytest.raises(CheckpointError) as raised, weights_only_loads():
        torch.load(str(shard), map_location="cpu", weights_only=False)  # as DeepSpeed loads it
    assert str(raised.value) == message
    with pytest.raises(CheckpointError) as raised:
        _consolidate_zero(tag)
    assert str(raised.value) == f"cannot consolidate DeepSpeed checkpoint {tag}: {message}"
