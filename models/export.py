"""Export format: config.json + model.safetensors (+ tokenizer.json), loadable without DeepSpeed."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from .config import ModelConfig
from .model import LossWeights, UnifiedModel
from .quantize import apply_quantization_record, quantization_record
from .sparsity import pruning_record, set_pruning_record

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


class WeightsMismatch(ValueError):
    """Weights whose names or shapes do not fit the model their config.json describes."""


def save_pretrained(
    model: UnifiedModel, out_dir: str | Path, tokenizer_path: str | Path | None = None
) -> Path:
    """Write `model` (full weights, not a ZeRO-3 partition) to `out_dir`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config_meta(model), indent=2) + "\n")
    save_model(model, str(out / WEIGHTS_FILE))  # stores the tied MLM decoder weight once
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    return out


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
