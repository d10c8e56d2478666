"""Checkpoints on disk: the layout of training tags, finding and validating them, and loading any
checkpoint as a model (for evaluation, export, deployment and warm starts).

Layout of `run_dir/checkpoints/` (written by vlp.pipeline.train.checkpointer):
    latest                      text file naming the newest complete tag (DeepSpeed's convention)
    global_step{N}/             DeepSpeed's files for that step, plus
        config.json             the model config (same format as an export's config.json)
        tokenizer.json          the tokenizer the run trains with
        vlp_state.json          written last: step, world size and the size of every file

Paths `load_model` accepts:
    export directory      config.json + model.safetensors + tokenizer.json (`vlp export`; also
                          the int8 and pruned exports of `vlp deploy quantize|prune`)
    ONNX export directory config.json + image_encoder.onnx + text_encoder.onnx + tokenizer.json
                          (`vlp deploy onnx`): the dual encoder only, run by ONNX Runtime
    DeepSpeed tag         runs/NAME/checkpoints/global_step{N}/ (complete: has vlp_state.json)
    checkpoints directory runs/NAME/checkpoints/ (its `latest` file names the tag)
ZeRO-3 shards are consolidated with DeepSpeed's own zero_to_fp32 on CPU: no engine, no process
group, any number of ranks in the checkpoint. Every failure is a UserError naming the path.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlp.models.onnx_encoders import GRAPH_FILES
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import read_json

TAG_PREFIX = "global_step"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "vlp_state.json"
LATEST_FILE = "latest"
RESUME_MODES = ("auto", "latest", "latest-valid", "none")
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
ONNX_FILES = tuple(GRAPH_FILES.values())
_TAG = re.compile(rf"{TAG_PREFIX}(\d+)")


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


def file_sizes(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def validate_tag(tag_dir: Path) -> list[str]:
    """Problems that make a tag unusable (empty list: it looks complete)."""
    state_path = tag_dir / STATE_FILE
    if not state_path.exists():
        return [f"{tag_dir} has no {STATE_FILE} (saving did not finish)"]
    try:
        state = json.loads(state_path.read_text())
        expected = state["files"]
    except (ValueError, KeyError, TypeError) as exc:
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
    """The tag's vlp_state.json, after checking every file it lists is there at full size."""
    problems = validate_tag(tag_dir)
    if problems:
        raise CheckpointError(f"incomplete or corrupt checkpoint {tag_dir}: {'; '.join(problems)}")
    state = read_json(tag_dir / STATE_FILE, "checkpoint state")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{tag_dir / STATE_FILE}: missing integer field 'step'")
    return state


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


# ---- loading a checkpoint as a model -----------------------------------------------------------

@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # the export or tag directory actually loaded
    kind: str  # "export" | "deepspeed" | "onnx"
    tag: str | None
    step: int | None
    config: dict


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    info: CheckpointInfo


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("export" | "onnx" | "deepspeed", directory) for any accepted path; resolves `latest`."""
    path = Path(path)
    if not path.is_dir():
        what = " (it is a file)" if path.is_file() else ""
        raise CheckpointError(f"checkpoint not found: {path} is not a directory{what}")
    if (path / "model.safetensors").exists():
        return "export", path
    if any((path / name).exists() for name in ONNX_FILES):
        missing = [name for name in ONNX_FILES if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"ONNX export {path} has no {', '.join(missing)}")
        return "onnx", path
    if (path / LATEST_FILE).is_file():
        tag = (path / LATEST_FILE).read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST_FILE} names tag {tag!r}, which is not in {path}")
        path = path / tag
    if (path / STATE_FILE).exists() or list(path.glob("*_model_states.pt")):
        return "deepspeed", path
    raise CheckpointError(
        f"{path} is not a checkpoint: expected an export directory ({', '.join(EXPORT_FILES)}), "
        f"a DeepSpeed tag directory (with {STATE_FILE}) or a checkpoints directory with a "
        f"'{LATEST_FILE}' file"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """(model in eval mode on `device`, tokenizer, CheckpointInfo) from any accepted path."""
    kind, directory = resolve_checkpoint(path)
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    if kind == "export":
        model, tag, step = _load_export(directory), None, None
    elif kind == "onnx":
        model, tag, step = _load_onnx(directory, device), None, None
    else:
        tag, step = directory.name, read_state(directory)["step"]
        model = _build_model(read_json(directory / "config.json", "model config"), directory)
        _load_weights(model, _consolidate_zero(directory), directory)
    tokenizer = _load_tokenizer(directory / "tokenizer.json")
    info = CheckpointInfo(str(directory), kind, tag, step, model.config.to_dict())
    if kind != "onnx":  # ONNX Runtime sessions stay where they were created (the CPU)
        model = model.to(device)
    return LoadedModel(model.eval(), tokenizer, info)


def require_full_model(loaded: LoadedModel, use: str) -> None:
    """CheckpointError unless `loaded` has the whole model: an ONNX export holds the two encoders
    only, enough for retrieval by embeddings but not for `use` (re-ranking, VQA, training)."""
    if loaded.info.kind == "onnx":
        raise CheckpointError(
            f"{loaded.info.path} is an ONNX export of the image and text encoders only; {use} "
            "needs the fusion layers and heads: use the export it was made from")


def load_float_model(path: str | Path, use: str,
                     device: str | torch.device = "cpu") -> LoadedModel:
    """`load_model` for a use that needs the float weights (a warm start, a teacher, pruning):
    CheckpointError for an ONNX export (encoders only) or an int8 one (rounded weights)."""
    from vlp.models.quantize import quantization_record

    loaded = load_model(path, device=device)
    require_full_model(loaded, use)
    if quantization_record(loaded.model) is not None:
        raise CheckpointError(f"{use}: {loaded.info.path} is an int8 export (`vlp deploy "
                              "quantize`); give the float export or checkpoint it was made from")
    return loaded


def _load_onnx(directory: Path, device: str | torch.device):
    if torch.device(device).type != "cpu":
        raise CheckpointError(f"ONNX export {directory} runs on the CPU (ONNX Runtime's CPU "
                              f"provider), not on {device}")
    from vlp.models.onnx_encoders import OnnxEncoders

    try:
        return OnnxEncoders(directory)
    except ImportError as exc:
        raise CheckpointError(f"{directory} is an ONNX export: install onnxruntime "
                              "(pip install 'vlp[deploy]')") from exc
    except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
        raise CheckpointError(f"cannot load ONNX export {directory}: {exc}") from exc


def _load_export(directory: Path) -> torch.nn.Module:
    from safetensors import SafetensorError

    from vlp.models.export import from_pretrained

    try:
        return from_pretrained(directory)
    except (ValueError, OSError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load export {directory}: {exc}") from exc


def _build_model(config_dict: dict, directory: Path) -> torch.nn.Module:
    """The model a training tag's config.json describes."""
    from vlp.models.export import model_from_meta

    try:
        return model_from_meta(config_dict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from exc


def _consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict from the ZeRO shards of one tag (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints progress on stdout; keep stdout for results.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot consolidate DeepSpeed checkpoint {tag_dir}: {exc}") from exc


def _load_weights(model: torch.nn.Module, state_dict: dict, directory: Path) -> None:
    from vlp.models.export import load_state_dict_checked

    try:
        load_state_dict_checked(model, state_dict)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"weights in {directory} do not fit its config.json: {exc}") from exc


def _load_tokenizer(path: Path):
    from vlp.pipeline.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except UserError:
        raise
    except Exception as exc:  # tokenizers raises its own exception types for a bad file
        raise CheckpointError(f"tokenizer {path} is unreadable: {exc}") from exc
