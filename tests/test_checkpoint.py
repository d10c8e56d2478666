"""Checkpoint publishing and validation, on tag directories laid out as training writes them."""
import json

import pytest

from vlp.pipeline.data.checkpoints import (
    CheckpointError,
    complete_tags,
    file_sizes,
    resolve_resume,
    validate_tag,
)
from vlp.pipeline.train.checkpointer import prune_checkpoints


def make_tag(ckpt_dir, step, files=None):
    """A published tag as save_checkpoint leaves it: shard files plus vlp_state.json."""
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 100,
                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 300}).items():
        (tag / name).write_bytes(data)
    state = {"step": step, "tag": tag.name, "world_size": 2, "files": file_sizes(tag)}
    (tag / "vlp_state.json").write_text(json.dumps(state))
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


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
    shard = bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:50])
    assert any("truncated" in p for p in validate_tag(bad))
    with pytest.raises(CheckpointError, match="latest-valid"):
        resolve_resume(tmp_path, "latest")
    assert resolve_resume(tmp_path, "latest-valid") == good


def test_partial_tags_are_never_candidates_and_are_pruned(tmp_path):
    good = make_tag(tmp_path, 10)
    partial = tmp_path / "global_step20.partial"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    unfinished = tmp_path / "global_step30"  # renamed but no state file: not complete
    unfinished.mkdir()
    assert complete_tags(tmp_path) == [good]
    assert validate_tag(unfinished)
    prune_checkpoints(tmp_path, keep_last=3)
    assert not partial.exists()


def test_keep_last_k(tmp_path):
    for step in (5, 10, 15, 20):
        make_tag(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in complete_tags(tmp_path)] == ["global_step15", "global_step20"]


def test_unknown_resume_mode(tmp_path):
    with pytest.raises(CheckpointError, match="choose one of"):
        resolve_resume(tmp_path, "newest")
