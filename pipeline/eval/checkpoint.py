"""Load a model for evaluation from an export directory or a DeepSpeed training checkpoint.

Accepted paths:
    export directory      config.json + model.safetensors + tokenizer.json (`vlp export`)
    DeepSpeed tag         runs/NAME/checkpoints/global_step{N}/ (complete: has vlp_state.json)
    checkpoints directory runs/NAME/checkpoints/ (its `latest` file names the tag)
ZeRO-3 shards are consolidated with DeepSpeed's own zero_to_fp32 on CPU: no engine, no process
group, any number of ranks in the checkpoint. Every failure is an EvalInputError naming the path.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.checkpoint import LATEST_FILE, STATE_FILE, validate_tag
from pipeline.eval.files import EvalInputError, read_json

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # the export or tag directory actually loaded
    kind: str  # "export" | "deepspeed"
    tag: str | None
    step: int | None
    config: dict


class EvalModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    info: CheckpointInfo


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("export" | "deepspeed", directory) for any accepted path; resolves `latest`."""
    path = Path(path)
    if not path.is_dir():
        raise EvalInputError(f"checkpoint not found: {path} is not a directory")
    if (path / "model.safetensors").exists():
        return "export", path
    if (path / LATEST_FILE).is_file():
        tag = (path / LATEST_FILE).read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise EvalInputError(f"{path / LATEST_FILE} names tag {tag!r}, which is not in {path}")
        path = path / tag
    if (path / STATE_FILE).exists() or list(path.glob("*_model_states.pt")):
        return "deepspeed", path
    raise EvalInputError(
        f"{path} is not a checkpoint: expected an export directory ({', '.join(EXPORT_FILES)}), "
        f"a DeepSpeed tag directory (with {STATE_FILE}) or a checkpoints directory with a "
        f"'{LATEST_FILE}' file"
    )


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu") -> EvalModel:
    """(model in eval mode on `device`, tokenizer, CheckpointInfo) from any accepted path."""
    kind, directory = resolve_checkpoint(path)
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise EvalInputError(f"checkpoint {directory} has no {name}")
    if kind == "export":
        model, tag, step = _load_export(directory), None, None
    else:
        tag, step = directory.name, _read_state(directory)["step"]
        model = _build_model(read_json(directory / "config.json", "model config"), directory)
        _load_weights(model, _consolidate_zero(directory), directory)
    tokenizer = _load_tokenizer(directory / "tokenizer.json")
    info = CheckpointInfo(str(directory), kind, tag, step, model.config.to_dict())
    return EvalModel(model.to(device).eval(), tokenizer, info)


def _load_export(directory: Path) -> torch.nn.Module:
    from models.export import from_pretrained
    from safetensors import SafetensorError

    try:
        return from_pretrained(directory)
    except (ValueError, OSError, RuntimeError, SafetensorError) as exc:
        raise EvalInputError(f"cannot load export {directory}: {exc}") from exc


def _build_model(config_dict: dict, directory: Path) -> torch.nn.Module:
    """The model a training tag's config.json describes."""
    from models.export import model_from_meta

    try:
        return model_from_meta(config_dict)
    except (TypeError, ValueError) as exc:
        raise EvalInputError(f"{directory / 'config.json'}: {exc}") from exc


def _read_state(tag_dir: Path) -> dict:
    """The tag's vlp_state.json, after checking every file it lists is there at full size."""
    problems = validate_tag(tag_dir)
    if problems:
        raise EvalInputError(f"incomplete or corrupt checkpoint {tag_dir}: {'; '.join(problems)}")
    state = read_json(tag_dir / STATE_FILE, "checkpoint state")
    if not isinstance(state.get("step"), int):
        raise EvalInputError(f"{tag_dir / STATE_FILE}: missing integer field 'step'")
    return state


def _consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict from the ZeRO shards of one tag (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints progress on stdout; keep stdout for results.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise EvalInputError(f"cannot consolidate DeepSpeed checkpoint {tag_dir}: {exc}") from exc


def _load_weights(model: torch.nn.Module, state_dict: dict, directory: Path) -> None:
    from models.export import load_state_dict_checked

    try:
        load_state_dict_checked(model, state_dict)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise EvalInputError(f"weights in {directory} do not fit its config.json: {exc}") from exc


def _load_tokenizer(path: Path):
    from data_prep.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as exc:  # tokenizers raises its own exception types for a bad file
        raise EvalInputError(f"tokenizer {path} is unreadable: {exc}") from exc
