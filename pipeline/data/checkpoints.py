"""Checkpoints on disk: the layout of training tags, finding, validating and fingerprinting them,
and loading their pickles safely. Loading a checkpoint as a model is model_loading.py.

Layout of `run_dir/checkpoints/` (written by vlp.pipeline.train.checkpointer):
    latest                      text file naming the newest complete tag (DeepSpeed's convention):
                                a plain directory name here, never a path
    global_step{N}/             DeepSpeed's files for that step, plus
        config.json             the model config (same format as an export's config.json)
        tokenizer.json          the tokenizer the run trains with
        vlp_state.json          written last: step, world size, publication time, and the size
                                and sha256 of every file (older tags: sizes only)
    global_step{N}.partial/     a tag being saved; .universal/ a copy for another world size;
                                .deleting/ a tag being pruned (renamed first, then deleted)

DeepSpeed's files are pickles, and DeepSpeed unpickles them in full (weights_only off). Validation
refuses a file whose pickle names any class beyond tensors, plain containers and the few
DeepSpeed types below (a static scan of the pickle, nothing is run), and every load of them goes
through `weights_only_loads()`, which makes torch's weights-only unpickler enforce the same list
inside DeepSpeed too. A tampered checkpoint can still hold wrong numbers, not code.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import read_json

TAG_PREFIX = "global_step"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_SUFFIX = ".universal"  # a tag converted for another world size (train/universal.py)
DELETING_SUFFIX = ".deleting"  # a tag being pruned (train/checkpointer.py)
STATE_FILE = "vlp_state.json"
MODEL_STATES = "model_states.pt"  # how the name of every DeepSpeed model file ends
LATEST_FILE = "latest"
RESUME_MODES = ("auto", "latest", "latest-valid", "none")
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_TAG = re.compile(rf"{TAG_PREFIX}(\d+)")
# The classes DeepSpeed's ZeRO checkpoint files pickle besides tensors and plain containers (which
# torch's weights-only unpickler allows anyway). Nothing else is ever unpickled.
DEEPSPEED_PICKLED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def tag_step(tag_dir: Path) -> int:
    """The step a published tag directory holds: global_step120 -> 120."""
    match = _TAG.fullmatch(Path(tag_dir).name)
    if match is None:
        raise CheckpointError(f"{tag_dir} is not a tag directory ({TAG_PREFIX}<step>)")
    return int(match[1])


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Published tag directories (named global_step<N>, with a state file), oldest first by step.
    Anything else in the directory (global_step6.bak, partial tags) is ignored."""
    tags = [p for p in Path(ckpt_dir).glob(f"{TAG_PREFIX}*")
            if _TAG.fullmatch(p.name) and p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(tags, key=tag_step)


def latest_tag(ckpt_dir: Path) -> Path | None:
    """The tag directory the `latest` file names (it may not exist), or None without one.
    CheckpointError unless it names a plain directory of `ckpt_dir`: an absolute path or `..`
    would lead resume and evaluation out of the run."""
    latest_file = Path(ckpt_dir) / LATEST_FILE
    if not latest_file.is_file():
        return None
    name = latest_file.read_text().strip()
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CheckpointError(f"{latest_file} names {name!r}, which is not a tag directory in "
                              f"{ckpt_dir}: it must hold a directory name such as "
                              f"{tag_for_step(120)}")
    return Path(ckpt_dir) / name


def published_time(tag_dir: Path) -> float:
    """When the tag was published (its state file's record, else the file's mtime)."""
    try:
        return float(json.loads((tag_dir / STATE_FILE).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return (tag_dir / STATE_FILE).stat().st_mtime


def tag_files(tag_dir: Path) -> list[str]:
    """The tag's files (relative names, sorted) that its state file describes."""
    return [str(p.relative_to(tag_dir)) for p in sorted(Path(tag_dir).rglob("*"))
            if p.is_file() and p.name != STATE_FILE]


def describe_files(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes": size, "sha256": hex digest}} of the named files of a tag."""
    described = {}
    for name in names:
        with open(Path(tag_dir) / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        described[name] = {"bytes": (Path(tag_dir) / name).stat().st_size, "sha256": digest}
    return described


def validate_tag(tag_dir: Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems that make a tag unusable (empty list: it is complete and safe to load).

    Every file's presence and size are checked; the sha256 of `part` = (i, n) of the files (the
    i-th of every n, so n ranks can share the reading) and, in those, the classes the pickled
    files need (only DEEPSPEED_PICKLED_TYPES beyond torch's weights-only set).
    """
    state_path = tag_dir / STATE_FILE
    if not state_path.exists():
        return [f"{tag_dir} has no {STATE_FILE} (saving did not finish)"]
    try:
        expected = json.loads(state_path.read_text())["files"]
        names = sorted(expected.keys())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{state_path} is unreadable: {exc!r}"]
    if not any(name.endswith(MODEL_STATES) for name in names):
        return [f"{state_path} lists no DeepSpeed model file (*{MODEL_STATES}) (corrupt: saving "
                "records every file it wrote)"]
    mine = set(names[part[0]::part[1]])
    problems = []
    for name in names:
        record = expected[name] if isinstance(expected[name], dict) else {"bytes": expected[name]}
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != record.get("bytes"):
            problems.append(f"{path} has {path.stat().st_size} bytes, expected "
                            f"{record.get('bytes')} (truncated?)")
        elif name in mine:
            problems += _content_problems(path, record.get("sha256"))
    return problems


def _content_problems(path: Path, sha256: str | None) -> list[str]:
    if sha256 is not None:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                return [f"{path} has the recorded size but not the recorded sha256 (corrupted)"]
    if path.suffix != ".pt":
        return []
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        return [f"{path} is not a readable torch file: {one_line(exc)}"]
    refused = sorted(needed - set(DEEPSPEED_PICKLED_TYPES))
    if refused:
        return [f"{path} is refused: its pickle needs {', '.join(refused)}, which is not among "
                "the types DeepSpeed checkpoints hold, and loading it would run that code"]
    return []


def one_line(exc: Exception) -> str:
    """An exception as one line; for torch's weights-only refusal, what it refused, without
    torch's advice to turn weights_only off (the lines naming it)."""
    text = str(exc)
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return f"its pickle needs {refused[1]}, which is not allowed"
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside runs torch's weights-only unpickler allowing only tensors, plain
    containers and DEEPSPEED_PICKLED_TYPES, also where DeepSpeed turns weights_only off (torch
    honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over the argument). A refused file is a
    CheckpointError naming it. Process-wide while it lasts."""
    allowed = [getattr(importlib.import_module(module), name)
               for module, name in (t.rsplit(".", 1) for t in DEEPSPEED_PICKLED_TYPES)]
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    load = torch.load
    torch.load = functools.partial(_load_or_refuse, load)  # DeepSpeed calls torch.load by name
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = load
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _load_or_refuse(load: Callable, f, *args, **kwargs):
    """`load(f, ...)`; a refusal of the weights-only unpickler becomes a CheckpointError naming
    the file, not torch's advice to load it with weights_only off (which would run its code)."""
    try:
        return load(f, *args, **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{f} could not be loaded safely: {one_line(exc)} (it is damaged "
                              "or was not written by DeepSpeed)") from None


def load_state(tag_dir: Path) -> dict:
    """The tag's vlp_state.json (not validated: see read_state)."""
    state = read_json(tag_dir / STATE_FILE, "checkpoint state")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{tag_dir / STATE_FILE}: missing integer field 'step'")
    return state


def read_state(tag_dir: Path) -> dict:
    """The tag's vlp_state.json, after checking every file it lists is there, whole and safe."""
    problems = validate_tag(tag_dir)
    if problems:
        raise CheckpointError(f"incomplete or corrupt checkpoint {tag_dir}: {'; '.join(problems)}")
    return load_state(tag_dir)


def resolve_resume(ckpt_dir: Path, mode: str, overwrite: bool = False,
                   validate: Callable[[Path], list[str]] = validate_tag) -> Path | None:
    """The tag directory to resume from, or None to start afresh; raises CheckpointError.

    `auto` without a `latest` file falls back to the newest valid tag (a kill between publishing
    a run's first tag and writing `latest` leaves that). Starting afresh where complete tags
    exist is refused unless `overwrite` (the caller then deletes them): a new run's tags mixed
    with an old run's would be pruned and resumed as one run. `validate` checks a tag (several
    ranks pass one that shares the work).
    """
    if mode not in RESUME_MODES:
        raise CheckpointError(f"checkpoint.resume={mode!r}; choose one of {', '.join(RESUME_MODES)}")
    ckpt_dir = Path(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    latest = latest_tag(ckpt_dir) if mode in ("auto", "latest") else None
    if mode == "none" or (mode == "auto" and latest is None and not tags):
        if tags and not overwrite:
            raise CheckpointError(
                f"checkpoint.resume=none, but {ckpt_dir} already holds {len(tags)} checkpoint(s) "
                f"({tags[0].name} .. {tags[-1].name}). Resume them (checkpoint.resume=auto), use "
                "another run_dir, or set checkpoint.overwrite=true to delete them and start "
                "afresh.")
        return None
    if mode == "latest-valid" or (mode == "auto" and latest is None):
        for tag_dir in reversed(tags):
            if not validate(tag_dir):
                return tag_dir
        raise CheckpointError(f"no valid checkpoint under {ckpt_dir}")
    if latest is None:
        raise CheckpointError(f"checkpoint.resume={mode} but {ckpt_dir / LATEST_FILE} does not "
                              "exist")
    problems = validate(latest)
    if problems:
        raise CheckpointError(
            f"the latest checkpoint {latest} is corrupt: {'; '.join(problems)}. "
            "Resume from the newest valid one with checkpoint.resume=latest-valid, or start "
            "afresh in another run_dir (or here with checkpoint.resume=none "
            "checkpoint.overwrite=true, which deletes this run's checkpoints).")
    return latest


def checkpoint_fingerprint(path: Path) -> str:
    """A digest of a checkpoint's content: of a tag's vlp_state.json (which records the sha256
    of every file, and the publication time), of an export's files. A tag rewritten after a
    rewind gets a new one."""
    path = Path(path)
    names = [STATE_FILE] if (path / STATE_FILE).is_file() else list(EXPORT_FILES)
    digest = hashlib.sha256()
    for name in names:
        if (path / name).is_file():
            with open(path / name, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
