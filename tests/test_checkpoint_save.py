"""Saving a checkpoint with a stub engine on real gloo ranks: what a tag holds when it is
published, what rank 0 alone writes, how the ranks share the hashing, the save interval and
loading. The real DeepSpeed engine saves through the launcher in tests/test_train_launcher.py."""
from __future__ import annotations

import json
import multiprocessing as mp
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlp.pipeline.data.checkpoints import (
    CheckpointError,
    complete_tags,
    describe_files,
    tag_files,
    validate_tag,
)
from vlp.pipeline.distributed import free_port
from vlp.pipeline.train.checkpointer import (
    Checkpointer,
    rank_state_in,
    save_checkpoint,
)

METADATA = {"config.json": '{"width": 64}', "tokenizer.json": '{"model": {}}'}


class StubEngine:
    """DeepSpeed's engine as the Checkpointer uses it: save_checkpoint writes one model-states
    file (rank 0) and this rank's optimizer shard into the tag directory it is given, and
    records how it was called; load_checkpoint returns `client_state`."""

    def __init__(self, module: torch.nn.Module | None = None, client_state: dict | None = None):
        self.module = module or torch.nn.Linear(2, 2)
        self.client_state = client_state
        self.saved, self.loaded = [], []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        self.saved.append({"save_dir": save_dir, "tag": tag, "client_state": client_state,
                           "save_latest": save_latest, "exclude_frozen": exclude_frozen_parameters})
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank()
        if rank == 0:
            torch.save({"module": self.module.state_dict(), "client_state": client_state},
                       tag_dir / "mp_rank_00_model_states.pt")
        torch.save({"partition": torch.full((10 + rank,), float(rank))},
                   tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        self.loaded.append({"load_dir": load_dir, "tag": tag, "strict": load_module_strict})
        return load_dir, self.client_state


def checkpointer(engine, ckpt_dir, **kwargs) -> Checkpointer:
    settings = {"every_steps": 3, "keep_last": 0, "save_initial": False, "max_steps": 10,
                "metadata": METADATA, "shared_state": lambda: {"samples_seen": 48},
                "rank_state": lambda: {"loader": [dist.get_rank(), 7]}, **kwargs}
    return Checkpointer(engine, ckpt_dir, **settings)


def test_a_save_is_published_whole_with_every_files_size_and_hash(one_rank, tmp_path):
    ckpt = tmp_path / "checkpoints"
    engine = StubEngine()
    seen = []
    saver = checkpointer(engine, ckpt, before_publish=lambda step, partial: seen.append(
        (step, partial.name, sorted(p.name for p in partial.iterdir()),
         (ckpt / "latest").exists())))
    before = time.time()
    tag = saver.save(3)

    assert tag == ckpt / "global_step3" and (ckpt / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step3", "latest"]
    [call] = engine.saved
    assert call == {"save_dir": str(ckpt), "tag": "global_step3.partial",
                    "client_state": {"samples_seen": 48, "step": 3, "world_size": 1},
                    "save_latest": False, "exclude_frozen": True}
    # the hook sees the partial tag with every file but the state, before anything is published
    files = ["config.json", "mp_rank_00_model_states.pt", "tokenizer.json", "vlp_rank0.json",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert seen == [(3, "global_step3.partial", files, False)]
    assert sorted(p.name for p in tag.iterdir()) == sorted(files + ["vlp_state.json"])
    for name, text in METADATA.items():
        assert (tag / name).read_text() == text
    assert json.loads((tag / "vlp_rank0.json").read_text()) == {"loader": [0, 7]}
    text = (tag / "vlp_state.json").read_text()
    assert text.startswith('{\n "step": 3,\n "tag": "global_step3",\n')  # for a reader's eye
    state = json.loads(text)
    assert (state["step"], state["tag"], state["world_size"]) == (3, "global_step3", 1)
    assert before <= state["time"] <= time.time()  # when it was published
    assert state["files"] == describe_files(tag, files)
    assert validate_tag(tag) == []


def test_a_leftover_partial_tag_is_replaced_and_a_tag_saved_again_is_overwritten(one_rank,
                                                                                  tmp_path):
    ckpt = tmp_path / "checkpoints"
    stale = ckpt / "global_step3.partial"
    stale.mkdir(parents=True)
    (stale / "from_a_killed_save.pt").write_bytes(b"x")
    saver = checkpointer(StubEngine(), ckpt)
    assert "from_a_killed_save.pt" not in tag_files(saver.save(3))
    (ckpt / "global_step3" / "stray.txt").write_text("from before")
    tag = saver.save(3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step3", "latest"]
    assert "from_a_killed_save.pt" not in tag_files(tag) and "stray.txt" not in tag_files(tag)
    assert validate_tag(tag) == []


def test_saving_prunes_to_keep_last(one_rank, tmp_path):
    ckpt = tmp_path / "checkpoints"
    saver = checkpointer(StubEngine(), ckpt, keep_last=2)
    for step in (3, 6, 9):
        saver.save(step)
    assert [t.name for t in complete_tags(ckpt)] == ["global_step6", "global_step9"]


@pytest.mark.parametrize("every, max_steps, initial, due", [
    (3, 10, False, [3, 6, 9, 10]),
    (3, 9, True, [0, 3, 6, 9]),
    (4, 4, False, [4]),
])
def test_a_checkpoint_is_due_every_interval_at_the_end_and_at_step_0_when_asked(
        tmp_path, every, max_steps, initial, due):
    saver = checkpointer(StubEngine(), tmp_path, every_steps=every, max_steps=max_steps,
                         save_initial=initial)
    assert [step for step in range(max_steps + 2) if saver.due(step)] == due
    saved = []
    saver.save = saved.append
    for step in range(max_steps + 1):
        saver.maybe_save(step)
    assert saved == due


def test_load_restores_strictly_unless_some_parameters_are_frozen(tmp_path):
    engine = StubEngine(client_state={"step": 6})
    saver = checkpointer(engine, tmp_path)
    assert saver.load(tmp_path / "global_step6") == {"step": 6}
    frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen[1].requires_grad_(False)
    engine.module = frozen
    saver.load(tmp_path / "global_step6")
    assert engine.loaded == [{"load_dir": str(tmp_path), "tag": "global_step6", "strict": True},
                             {"load_dir": str(tmp_path), "tag": "global_step6", "strict": False}]
    engine.client_state = None
    message = f"DeepSpeed could not load {tmp_path / 'global_step6'}"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        saver.load(tmp_path / "global_step6")


def test_a_ranks_own_state_comes_from_its_file_or_from_an_older_tags_client_state(tmp_path):
    (tmp_path / "vlp_rank1.json").write_text('{"loader": [1, 5]}')
    assert rank_state_in(tmp_path, 1, {"ranks": [{"loader": "old0"}, {"loader": "old1"}]}) == {
        "loader": [1, 5]}
    assert rank_state_in(tmp_path, 0, {"ranks": [{"loader": "old0"}, {"loader": "old1"}]}) == {
        "loader": "old0"}
    with pytest.raises(FileNotFoundError):
        rank_state_in(tmp_path, 0, {"step": 3})


def _save_on_rank(rank: int, port: int, ckpt: str, out: str | None = None) -> list:
    """save_checkpoint on this rank; the tag directories its hook was called with."""
    if out is not None:  # a forked child: the parent's OpenMP threads are not there
        torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        hooked = []
        save_checkpoint(StubEngine(), Path(ckpt), 6, {"step": 6, "world_size": 2}, METADATA,
                        keep_last=0, before_publish=hooked.append, rank_state={"rank": rank})
        if out is not None:
            Path(out).write_text(json.dumps(hooked, default=str))
    finally:
        dist.destroy_process_group()
    return hooked


def test_two_ranks_save_one_tag_that_rank_0_publishes_with_both_ranks_hashes(tmp_path):
    """This process is rank 0 and a forked child rank 1 (so a mutated save runs on both). Each
    rank hashes every second file; rank 0 alone writes the metadata, calls the hook and
    publishes."""
    ckpt, out = tmp_path / "checkpoints", tmp_path / "rank1_hook.json"
    port = free_port()
    child = mp.get_context("fork").Process(target=_save_on_rank, args=(1, port, ckpt, str(out)))
    child.start()
    hooked = _save_on_rank(0, port, str(ckpt))
    child.join(timeout=30)
    assert child.exitcode == 0
    assert hooked == [ckpt / "global_step6.partial"]
    assert json.loads(out.read_text()) == []  # rank 1 never calls the hook

    tag = ckpt / "global_step6"
    files = ["config.json", "mp_rank_00_model_states.pt", "tokenizer.json", "vlp_rank0.json",
             "vlp_rank1.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert tag_files(tag) == files
    state = json.loads((tag / "vlp_state.json").read_text())
    assert (state["step"], state["world_size"]) == (6, 2)
    assert state["files"] == describe_files(tag, files)
    assert json.loads((tag / "vlp_rank1.json").read_text()) == {"rank": 1}
    assert (ckpt / "latest").read_text() == "global_step6"
    assert validate_tag(tag) == []
