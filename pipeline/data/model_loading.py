"""Any checkpoint as a model, for evaluation, export, deployment and warm starts.

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
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlp.models.onnx_encoders import GRAPH_FILES
from vlp.pipeline.data.checkpoints import (
    EXPORT_FILES,
    LATEST_FILE,
    MODEL_STATES,
    STATE_FILE,
    CheckpointError,
    latest_tag,
    one_line,
    read_state,
    weights_only_loads,
)
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import read_json

ONNX_FILES = tuple(GRAPH_FILES.values())


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
    latest = latest_tag(path)
    if latest is not None:
        if not latest.is_dir():
            raise CheckpointError(f"{path / LATEST_FILE} names tag {latest.name!r}, which is not "
                                  f"in {path}")
        path = latest
    if (path / STATE_FILE).exists() or list(path.glob(f"*_{MODEL_STATES}")):
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
        weights = _consolidate_zero(directory)
        model = _build_model(read_json(directory / "config.json", "model config"), weights,
                             directory)
        _load_weights(model, weights, directory)
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


def _build_model(config_dict, weights: dict[str, torch.Tensor],
                 directory: Path) -> torch.nn.Module:
    """The model a training tag's config.json describes, allocated only once `weights` are
    known to fit it."""
    from vlp.models.export import WeightsMismatch, model_for_weights

    shapes = {key: tuple(value.shape) for key, value in weights.items()}
    try:
        return model_for_weights(config_dict, shapes)
    except WeightsMismatch as exc:
        raise CheckpointError(f"weights in {directory} do not fit its config.json: {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from exc


def _consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict from the ZeRO shards of one tag (DeepSpeed's zero_to_fp32, its pickles
    loaded weights-only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints progress on stdout; keep stdout for results.
    try:
        with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (CheckpointError, OSError, ValueError, KeyError, RuntimeError, EOFError,
            pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot consolidate DeepSpeed checkpoint {tag_dir}: "
                              f"{one_line(exc)}") from exc


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
