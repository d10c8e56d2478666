"""Training checkpoints: DeepSpeed's sharded files plus our metadata, published atomically.

Layout of `run_dir/checkpoints/`:
    latest                      text file naming the newest complete tag (DeepSpeed's convention)
    global_step{N}/             DeepSpeed's files for that step, plus
        config.json             the model config (same format as an export's config.json)
        tokenizer.json          the tokenizer the run trains with
        vlp_state.json          written last: step, world size and the size of every file

A tag is first written as `global_step{N}.partial` and renamed when every rank has finished, so a
kill during saving leaves the previous checkpoint and `latest` untouched. The file sizes in
vlp_state.json let resume refuse a truncated checkpoint before DeepSpeed opens it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

TAG_PREFIX = "global_step"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "vlp_state.json"
LATEST_FILE = "latest"
RESUME_MODES = ("auto", "latest", "latest-valid", "none")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def tag_step(tag_dir: Path) -> int:
    """The step a published tag directory holds: global_step120 -> 120."""
    return int(Path(tag_dir).name[len(TAG_PREFIX):])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sizes(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, metadata_files: dict,
                    keep_last: int, before_publish: Callable[[Path], None] | None = None) -> Path:
    """Save on all ranks; publish the tag and prune old ones on rank 0. Returns the tag dir.

    `metadata_files` maps a file name to the text to write into the tag (config, tokenizer).
    `before_publish` is called on rank 0 with the partial tag directory once every file but
    vlp_state.json is written (fault-injection tests kill the process there).
    """
    tag = tag_for_step(step)
    partial = tag + PARTIAL_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shard files are on disk
    final = ckpt_dir / tag
    if rank == 0:
        partial_dir = ckpt_dir / partial
        for name, text in metadata_files.items():
            (partial_dir / name).write_text(text)
        if before_publish is not None:
            before_publish(partial_dir)
        state = {"step": step, "tag": tag, "world_size": dist.get_world_size(),
                 "time": time.time(), "files": file_sizes(partial_dir)}
        (partial_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial_dir, final)
        _write_atomic(ckpt_dir / LATEST_FILE, tag)
        prune_checkpoints(ckpt_dir, keep_last)
    dist.barrier()
    return final


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Published tag directories (with a state file), oldest first by step."""
    tags = [p for p in Path(ckpt_dir).glob(f"{TAG_PREFIX}*")
            if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and (p / STATE_FILE).exists()]
    return sorted(tags, key=tag_step)


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete tags, and leftover partial tags."""
    for partial in Path(ckpt_dir).glob(f"*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial, ignore_errors=True)
    if keep_last > 0:
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def validate_tag(tag_dir: Path) -> list[str]:
    """Problems that make a tag unusable (empty list: it looks complete)."""
    state_path = tag_dir / STATE_FILE
    if not state_path.exists():
        return [f"{tag_dir} has no {STATE_FILE} (saving did not finish)"]
    try:
        state = json.loads(state_path.read_text())
        expected = state["files"]
    except (ValueError, KeyError) as exc:
        return [f"{state_path} is unreadable: {exc}"]
    problems = []
    for name, size in expected.items():
        path = tag_dir / name
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, expected {size} (truncated?)")
    return problems


def read_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / STATE_FILE).read_text())


def resolve_resume(ckpt_dir: Path, mode: str) -> Path | None:
    """The tag directory to resume from, or None to start fresh; raises CheckpointError."""
    if mode not in RESUME_MODES:
        raise CheckpointError(f"checkpoint.resume={mode!r}; choose one of {', '.join(RESUME_MODES)}")
    latest_file = Path(ckpt_dir) / LATEST_FILE
    if mode == "none" or (mode == "auto" and not latest_file.exists()):
        return None
    if mode == "latest-valid":
        for tag_dir in reversed(complete_tags(ckpt_dir)):
            if not validate_tag(tag_dir):
                return tag_dir
        raise CheckpointError(f"no valid checkpoint under {ckpt_dir}")
    if not latest_file.exists():
        raise CheckpointError(f"checkpoint.resume={mode} but {latest_file} does not exist")
    tag_dir = Path(ckpt_dir) / latest_file.read_text().strip()
    problems = validate_tag(tag_dir)
    if problems:
        raise CheckpointError(
            f"the latest checkpoint {tag_dir} is corrupt: {'; '.join(problems)}. "
            "Resume from the newest valid one with checkpoint.resume=latest-valid, "
            "or start fresh with checkpoint.resume=none."
        )
    return tag_dir
