"""Checkpoint publishing and validation, on tag directories laid out as training writes them."""
import json
import shutil

import pytest
from train_helpers import SHARDS, make_tag

from vlp.pipeline.data.checkpoints import (
    CheckpointError,
    complete_tags,
    resolve_resume,
    validate_tag,
)
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
    from vlp.pipeline.eval.nightly.runner import discover_checkpoints

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
