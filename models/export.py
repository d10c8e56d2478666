"""Export format: config.json + model.safetensors (+ tokenizer.json), loadable without DeepSpeed,
plus a model card (README.md) and, for float weights, the files that let `transformers` and
open_clip load the dual encoder (models/interop.py)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .interop import (
    HF_CONFIG,
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_DIR,
    OPEN_CLIP_WEIGHTS_FILE,
    REMOTE_CODE_DIR,
    REMOTE_CODE_FILES,
    TOKENIZER_CONFIG_FILE,
    open_clip_config,
    open_clip_state_dict,
    tokenizer_config,
)
from .model import LossWeights, UnifiedModel
from .model_card import CARD_FILE, model_card
from .quantize import apply_quantization_record, quantization_record
from .sparsity import pruning_record, set_pruning_record

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
# Everything save_pretrained may write: what an earlier export left there and this one does not
# write (the interop files of a float export replaced by an int8 one) is removed.
EXPORT_NAMES = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CARD_FILE,
                OPEN_CLIP_DIR, *REMOTE_CODE_FILES}
FILE_MODE, DIR_MODE = 0o644, 0o755  # readable by the group and others, whatever the umask


class WeightsMismatch(ValueError):
    """Weights whose names or shapes do not fit the model their config.json describes."""


def save_pretrained(
    model: UnifiedModel, out_dir: str | Path, tokenizer_path: str | Path | None = None,
    special_tokens: dict[str, str] | None = None, provenance: dict | None = None,
    evaluation: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Write `model` (full weights, not a ZeRO-3 partition) to `out_dir`; returns the directory.

    `special_tokens` ({"pad_token": "[PAD]", ...}) adds tokenizer_config.json; `provenance`
    (source, step, data; kept in config.json) and `evaluation` ({benchmark: {metric: value}})
    go into the model card. The files are written into a staging folder inside `out_dir`, then
    moved into place one by one (os.replace), readable by all whatever the umask (_publish)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=out))
    try:
        meta = config_meta(model) | ({"provenance": provenance} if provenance else {})
        if quantization_record(model) is None:  # int8 weights load through vlp only
            meta |= HF_CONFIG
            _write_interop(model, staging, tokenizer_path, special_tokens)
        _write_own_files(model, meta, staging, tokenizer_path, special_tokens)
        files = sorted(path.name for path in staging.iterdir())
        (staging / CARD_FILE).write_text(model_card(meta, files, evaluation))
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_own_files(model: UnifiedModel, meta: dict, folder: Path,
                     tokenizer_path: str | Path | None,
                     special_tokens: dict[str, str] | None) -> None:
    """config.json, model.safetensors and the tokenizer files."""
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(_unique_tensors(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_tokenizer(folder, tokenizer_path, special_tokens, model.config.max_text_len)


def _write_tokenizer(folder: Path, tokenizer_path: str | Path | None,
                     special_tokens: dict[str, str] | None, max_text_len: int) -> None:
    if tokenizer_path is None:
        return
    shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
    if special_tokens:
        (folder / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(tokenizer_config(special_tokens, max_text_len), indent=2) + "\n")


def _write_interop(model: UnifiedModel, folder: Path, tokenizer_path: str | Path | None,
                   special_tokens: dict[str, str] | None) -> None:
    """transformers' remote code beside the export's files, and the open_clip folder."""
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    open_clip = folder / OPEN_CLIP_DIR
    open_clip.mkdir()
    (open_clip / OPEN_CLIP_CONFIG_FILE).write_text(
        json.dumps(open_clip_config(model.config), indent=2) + "\n")
    save_file(open_clip_state_dict(model), str(open_clip / OPEN_CLIP_WEIGHTS_FILE),
              metadata={"format": "pt"})
    _write_tokenizer(open_clip, tokenizer_path, special_tokens, model.config.max_text_len)


def _unique_tensors(model: UnifiedModel) -> dict[str, torch.Tensor]:
    """The state dict with a tied weight once, under its first name (the token embedding's, which
    the transformers dual encoder reads; vlp's loader accepts either)."""
    groups = _tie_groups(model.state_dict(keep_vars=True))
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()
            if groups[name][0] == name}


def _publish(staging: Path, out: Path) -> None:
    """Move the staged files into `out`, readable by all (FILE_MODE, DIR_MODE), config.json last
    (a reader that finds the new config finds the new weights); remove the EXPORT_NAMES that an
    earlier export left and this one did not write."""
    for path in staging.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
    out.chmod(DIR_MODE)
    staged = sorted((path.name for path in staging.iterdir()), key=lambda name: name == CONFIG_FILE)
    for name in EXPORT_NAMES - set(staged):
        _remove(out / name)
    for name in staged:
        if (out / name).is_dir():  # os.replace cannot replace a folder that has files
            _remove(out / name)
        os.replace(staging / name, out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def config_meta(model: UnifiedModel) -> dict:
    """The config.json of an export and of a training tag: format version, model config, the
    VQA head's answer count (None without one), the loss weights the weights were trained with
    (an evaluation can tell, say, whether the captioning head was ever trained) and, for a
    compressed model, what was quantized (models/quantize.py) or pruned (models/sparsity.py)."""
    meta = {"format_version": FORMAT_VERSION, **model.config.to_dict(),
            "vqa_num_answers": model.num_answers, "vqa_fusion": model.vqa_fusion,
            "loss_weights": asdict(model.loss_weights)}
    records = {"quantization": quantization_record(model), "pruning": pruning_record(model)}
    return meta | {key: record for key, record in records.items() if record is not None}


def model_from_meta(meta: dict) -> UnifiedModel:
    """The freshly initialised model a `config_meta` dict describes; ValueError names a bad key or
    another format version."""
    values = dict(meta)
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"format_version {version!r}, this code reads {FORMAT_VERSION}")
    num_answers = values.pop("vqa_num_answers", None)
    if num_answers is not None and not (type(num_answers) is int and num_answers >= 1):
        raise ValueError(f"vqa_num_answers must be a positive integer or null, got "
                         f"{num_answers!r:.40}")
    fusion = values.pop("vqa_fusion", "fused")
    for key in [*HF_CONFIG, "provenance"]:  # read by transformers and the model card
        values.pop(key, None)
    quantization, pruning = values.pop("quantization", None), values.pop("pruning", None)
    # Files written before the weights were recorded: the defaults, which have no LM.
    weights = values.pop("loss_weights", {})
    unknown = sorted(set(weights) - {f.name for f in fields(LossWeights)})
    if unknown:
        raise ValueError(f"unknown loss_weights key(s) {unknown}")
    model = UnifiedModel(ModelConfig.from_dict(values), LossWeights(**weights))
    if num_answers:
        model.attach_vqa_head(num_answers, fusion=fusion)
    if quantization is not None:
        apply_quantization_record(model, quantization)
    set_pruning_record(model, pruning)
    return model


def from_pretrained(model_dir: str | Path, device: str | torch.device = "cpu") -> UnifiedModel:
    """Rebuild a `UnifiedModel` (with its VQA head, if it was saved with one), in eval mode.

    config.json is checked against the weights' shapes (read from the safetensors header)
    before anything is allocated; a bad or absurd config is a ValueError naming the file."""
    path = Path(model_dir)
    with safe_open(str(path / WEIGHTS_FILE), "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    try:
        model = model_for_weights(json.loads((path / CONFIG_FILE).read_text()), shapes)
    except ValueError as exc:
        raise ValueError(f"{path / CONFIG_FILE}: {exc}") from exc
    load_state_dict_checked(model, load_file(str(path / WEIGHTS_FILE)))
    return model.to(device).eval()


def model_for_weights(meta, shapes: dict[str, tuple[int, ...]]) -> UnifiedModel:
    """The freshly initialised model a config.json (`meta`) describes, built only after a copy
    without storage (torch's meta device) showed that weights of these `shapes` fit it: a config
    with absurd sizes is refused before anything is allocated. ValueError otherwise."""
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    depth = meta.get("depth")
    if isinstance(depth, int) and depth > len(shapes):  # every block holds several tensors
        raise ValueError(f"depth {depth}, but the weights hold {len(shapes)} tensors in all")
    with torch.device("meta"):
        skeleton = model_from_meta(meta)
    check_state_dict(skeleton, {key: torch.empty(shape, device="meta")
                                for key, shape in shapes.items()})
    return model_from_meta(meta)


def load_state_dict_checked(model: UnifiedModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped key instead of a bare error.

    Accepts keys prefixed with `module.` (DDP / DeepSpeed) and checkpoints that store a tied
    weight under only one of its names.
    """
    state_dict = check_state_dict(model, state_dict)
    # Everything is checked; strict=False only lets a tied weight arrive under one of its names.
    model.load_state_dict(state_dict, strict=False)


def check_state_dict(model: UnifiedModel, state_dict: dict[str, torch.Tensor]) -> dict:
    """`state_dict` without a `module.` prefix, after checking that its names and shapes fit
    `model` (only shapes are read: meta tensors work); WeightsMismatch naming every problem."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = model.state_dict(keep_vars=True)
    tied = _tie_groups(expected)
    missing = [k for k in expected if not any(name in state_dict for name in tied[k])]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} key(s):\n  "
                        + "\n  ".join(mismatched))
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"not in the model: {unexpected}")
        if model.vqa_head is None and any(k.startswith("vqa_head.") for k in unexpected):
            problems.append("the checkpoint has a VQA head: "
                            "call model.attach_vqa_head(num_answers) first")
    if problems:
        raise WeightsMismatch("checkpoint does not fit this model; it is probably from another "
                              f"config (model: {model.config})\n" + "\n".join(problems))
    return state_dict


def _tie_groups(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Map each key to all keys holding the same Parameter (itself included)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    return {name: groups[id(tensor)] for name, tensor in state.items()}
