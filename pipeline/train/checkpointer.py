"""Saving training checkpoints: DeepSpeed's sharded files plus our metadata, published atomically.

The Checkpointer owns the interval (every `checkpoint.every_steps` steps, at the end, and the
untrained weights when asked). A tag is first written as `global_step{N}.partial` and renamed
when every rank has finished, so a kill during saving leaves the previous checkpoint and `latest`
untouched; `vlp_state.json`, written last, records every file's size and sha256 (the ranks share
the hashing) so resume refuses a truncated or corrupted checkpoint before DeepSpeed opens it.
Pruning keeps the most recently published tags and never the one just written or the one
`latest` names; a tag it deletes is first renamed `global_step{N}.deleting`, so a deletion cut
short never leaves half a tag under a tag's name. The layout and the reading side are in
vlp.pipeline.data.checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from vlp.pipeline.data.checkpoints import (
    DELETING_SUFFIX,
    LATEST_FILE,
    PARTIAL_SUFFIX,
    STATE_FILE,
    TAG_PREFIX,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    complete_tags,
    describe_files,
    latest_tag,
    published_time,
    tag_files,
    tag_for_step,
    weights_only_loads,
)
from vlp.pipeline.data.files import write_text_atomic

log = logging.getLogger(__name__)
# The directories of a run: its tags, and the leftovers of saving, converting (universal.py) and
# pruning. Nothing else is ever deleted (a user's global_step_notes.partial, global_step6.bak).
_OURS = re.compile(rf"{TAG_PREFIX}\d+(?P<leftover>({re.escape(UNIVERSAL_SUFFIX)})?"
                   rf"{re.escape(PARTIAL_SUFFIX)}|{re.escape(UNIVERSAL_SUFFIX)}|"
                   rf"{re.escape(DELETING_SUFFIX)})?")


# Each rank's own part of a tag (loader position, RNG states), written by that rank alone: under
# ZeRO-1/2 only rank 0 writes DeepSpeed's model-states file (and its client_state).
RANK_STATE_FILE = "vlp_rank{rank}.json"


class Checkpointer:
    """Saves and restores one run's checkpoints in `ckpt_dir`.

    `shared_state()` returns what every rank agrees on (counters), saved in DeepSpeed's
    client_state; `rank_state()` this rank's own part (loader position, RNG states), saved in the
    tag's RANK_STATE_FILE of this rank and read back by `rank_state_in`. `metadata` maps file
    names to the text written into each tag (config.json, tokenizer.json).
    """

    def __init__(self, engine, ckpt_dir: Path, *, every_steps: int, keep_last: int,
                 save_initial: bool, max_steps: int, metadata: dict[str, str],
                 shared_state: Callable[[], dict], rank_state: Callable[[], dict],
                 before_publish: Callable[[int, Path], None] | None = None):
        self.engine, self.ckpt_dir = engine, Path(ckpt_dir)
        self.every_steps, self.keep_last = every_steps, keep_last
        self.save_initial, self.max_steps = save_initial, max_steps
        self.metadata = metadata
        self.shared_state, self.rank_state = shared_state, rank_state
        self.before_publish = before_publish

    def due(self, step: int) -> bool:
        if step == 0:
            return self.save_initial
        return step % self.every_steps == 0 or step == self.max_steps

    def maybe_save(self, step: int) -> None:
        if self.due(step):
            self.save(step)

    def save(self, step: int) -> Path:
        """Save on all ranks; publish and prune on rank 0."""
        client_state = {**self.shared_state(), "step": step, "world_size": dist.get_world_size()}
        return save_checkpoint(self.engine, self.ckpt_dir, step, client_state, self.metadata,
                               self.keep_last, self._hook(step), rank_state=self.rank_state())

    def _hook(self, step: int):
        if self.before_publish is None:
            return None
        return lambda partial_dir: self.before_publish(step, partial_dir)

    def load(self, tag_dir: Path) -> dict:
        """Restore the engine (weights, optimizer, schedule) from `tag_dir`; its client_state.

        Frozen parameters (a distillation teacher) were left out when saving and keep the
        values the run loaded from their own source, so their absence is not an error."""
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())
        with weights_only_loads():
            _, client_state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag_dir.name,
                                                          load_module_strict=not frozen)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
        return client_state


def rank_state_in(tag_dir: Path, rank: int, client_state: dict) -> dict:
    """What rank `rank` saved of its own in `tag_dir` (`client_state`: the tag's, which held
    every rank's part in tags written before the per-rank files)."""
    path = Path(tag_dir) / RANK_STATE_FILE.format(rank=rank)
    if not path.exists() and "ranks" in client_state:
        return client_state["ranks"][rank]
    return json.loads(path.read_text(encoding="utf-8"))


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, metadata_files: dict,
                    keep_last: int, before_publish: Callable[[Path], None] | None = None,
                    rank_state: dict | None = None) -> Path:
    """Save on all ranks; publish the tag and prune old ones on rank 0. Returns the tag dir.

    `metadata_files` maps a file name to the text to write into the tag (config, tokenizer);
    `rank_state`, this rank's own state, goes to its RANK_STATE_FILE.
    `before_publish` is called on rank 0 with the partial tag directory once every file but
    vlp_state.json is written (fault-injection tests kill the process there).
    """
    tag = tag_for_step(step)
    partial_dir = ckpt_dir / (tag + PARTIAL_SUFFIX)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
    dist.barrier()
    # Frozen parameters (a distillation teacher) are not the run's weights: they are left out,
    # so the tag consolidates to exactly the trained model.
    engine.save_checkpoint(str(ckpt_dir), tag=partial_dir.name, client_state=client_state,
                           save_latest=False, exclude_frozen_parameters=True)
    if rank_state is not None:
        (partial_dir / RANK_STATE_FILE.format(rank=rank)).write_text(json.dumps(rank_state))
    if rank == 0:
        for name, text in metadata_files.items():
            (partial_dir / name).write_text(text)
    dist.barrier()  # every rank's files are on disk
    files = [None] * world
    dist.all_gather_object(files, describe_files(partial_dir, tag_files(partial_dir)[rank::world]))
    final = ckpt_dir / tag
    if rank == 0:
        if before_publish is not None:
            before_publish(partial_dir)
        state = {"step": step, "tag": tag, "world_size": world, "time": time.time(),
                 "files": {name: record for part in files for name, record in part.items()}}
        (partial_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial_dir, final)
        write_text_atomic(ckpt_dir / LATEST_FILE, tag)
        prune_checkpoints(ckpt_dir, keep_last, current=final)
    dist.barrier()
    return final


def prune_checkpoints(ckpt_dir: Path, keep_last: int, current: Path | None = None) -> None:
    """Delete leftover partial tags and universal copies, and all but the `keep_last` most
    recently published complete tags (0 keeps all), never `current` (the tag just written) or the
    one `latest` names.

    Newest by publication, not by step: a run restarted in a directory with higher-numbered tags
    must not delete what it just saved. A failure to delete is logged, not raised: it happens on
    rank 0 while the other ranks wait at a barrier.
    """
    ckpt_dir = Path(ckpt_dir)
    doomed, _ = _run_dirs(ckpt_dir)
    if keep_last > 0:
        protected = {current, latest_tag(ckpt_dir)}
        newest_first = sorted(complete_tags(ckpt_dir), key=published_time, reverse=True)
        doomed += [tag for tag in newest_first[keep_last:] if tag not in protected]
    for path in doomed:
        try:
            _delete(path)
        except OSError as exc:
            log.warning("could not delete old checkpoint %s: %s", path, exc)


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Delete every tag (complete or not), every leftover and `latest`
    (checkpoint.overwrite=true)."""
    leftovers, tags = _run_dirs(Path(ckpt_dir))
    for path in leftovers + tags:
        _delete(path)
    (Path(ckpt_dir) / LATEST_FILE).unlink(missing_ok=True)


def _run_dirs(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """(leftovers, tag directories) of the run in `ckpt_dir`, each sorted by name."""
    leftovers, tags = [], []
    for path in sorted(ckpt_dir.glob(f"{TAG_PREFIX}*")):
        match = _OURS.fullmatch(path.name)
        if match:
            (tags if match["leftover"] is None else leftovers).append(path)
    return leftovers, tags


def _delete(path: Path) -> None:
    """Delete a tag or leftover directory. A tag is renamed to a leftover first, so a deletion
    cut short (a kill, a file that will not go) leaves a leftover the next prune removes, never
    half a tag that resume or the nightly job would take for complete."""
    if _OURS.fullmatch(path.name)["leftover"] is None:
        path = path.rename(path.with_name(path.name + DELETING_SUFFIX))
    shutil.rmtree(path)
