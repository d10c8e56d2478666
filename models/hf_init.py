"""Start the text tower from a local Hugging Face BERT checkpoint and the image tower from a ViT
one (a folder written by `save_pretrained`), as VisualBERT starts from BERT and ALBEF and VLMo
from pretrained ViT and BERT.

ViT is a pre-LN transformer like this model, so its layers map one to one: shared attention and
its LayerNorm, V-FFN, patch embedding, CLS, positions, final LayerNorm. BERT is post-LN: its
token and position embeddings (the type-0 embedding folded into the positions), FFNs (as L-FFN
and VL-FFN, with the LayerNorm that precedes each one in BERT as the expert's pre-LN) and MLM
head map directly; the attention weights are one self-attention shared by both modalities, so
they come from the image checkpoint when both are given (VLMo's choice), and from BERT alone
otherwise (each block's LayerNorm then is the one BERT applies to that block's input).
docs/interop.md has the full table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import load_file

from .config import ModelConfig
from .model import UnifiedModel

TEXT_MODEL_TYPES, IMAGE_MODEL_TYPES = ("bert",), ("vit",)
Combine = Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]


class HFInitError(ValueError):
    """A Hugging Face checkpoint that cannot initialise the model: files missing, or another
    architecture, depth, head count or tensor shape."""


class Rule(NamedTuple):
    """One model tensor, made from checkpoint tensors (the first unless `combine` says how)."""

    target: str
    sources: tuple[str, ...]
    combine: Combine = lambda tensors, config: tensors[0]


class InitReport(NamedTuple):
    """What `pretrained_weights` did: model tensor -> the checkpoint tensors it came from, the
    checkpoint tensors not used and the model tensors left at their initialisation. Checkpoint
    tensors are named "text:NAME" or "image:NAME"."""

    loaded: dict[str, list[str]]
    unused: list[str]
    kept: list[str]

    def summary(self) -> str:
        return "\n".join([
            f"initialised from Hugging Face checkpoints: {len(self.loaded)} tensors",
            f"not loaded from the checkpoints ({len(self.unused)}): "
            f"{', '.join(self.unused) or '-'}",
            f"kept at their initialisation ({len(self.kept)}): {', '.join(self.kept) or '-'}"])


def init_towers(model: UnifiedModel, text_from: str | Path | None = None,
                image_from: str | Path | None = None) -> InitReport:
    """Copy the mapped weights into `model` (full tensors, not a ZeRO-3 partition)."""
    weights, report = pretrained_weights(model.config, text_from, image_from)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return report


def pretrained_weights(config: ModelConfig, text_from: str | Path | None = None,
                       image_from: str | Path | None = None
                       ) -> tuple[dict[str, torch.Tensor], InitReport]:
    """{model parameter name: tensor} mapped from the checkpoints, and the report; every tensor is
    checked against the shape `config` gives it (HFInitError names both shapes)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in UnifiedModel(config).named_parameters()}
    weights, loaded, unused = {}, {}, []
    sources = [("image", image_from, IMAGE_MODEL_TYPES, _vit_rules(config)),
               ("text", text_from, TEXT_MODEL_TYPES, _bert_rules(config, shared=not image_from))]
    for tower, path, model_types, rules in sources:
        if path is None:
            continue
        tensors = _read_checkpoint(path, model_types, config)
        used = set()
        for rule in rules:
            if rule.target not in shapes or not all(s in tensors for s in rule.sources):
                continue
            weights[rule.target] = _checked(rule, tensors, shapes[rule.target], config, path)
            loaded[rule.target] = [f"{tower}:{s}" for s in rule.sources]
            used.update(rule.sources)
        if not used:
            raise HFInitError(f"{path}: no tensor has a name the {tower} mapping reads "
                              "(docs/interop.md)")
        unused += [f"{tower}:{name}" for name in tensors if name not in used]
    kept = [name for name in shapes if name not in weights]
    return weights, InitReport(loaded, unused, kept)


def _checked(rule: Rule, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
             config: ModelConfig, path: str | Path) -> torch.Tensor:
    """The rule's tensor (fp32), or HFInitError naming its sources and both shapes."""
    value = rule.combine([tensors[s] for s in rule.sources], config).float()
    if tuple(value.shape) != shape:
        given = " and ".join(f"{s} {tuple(tensors[s].shape)}" for s in rule.sources)
        made = f" make {tuple(value.shape)}" if len(rule.sources) > 1 else ""
        raise HFInitError(f"{path}: {given}{made}, but the model's {rule.target} has shape "
                          f"{shape}")
    return value


def check_sources(config: ModelConfig, text_from: str | Path | None = None,
                  image_from: str | Path | None = None) -> None:
    """The checks of the checkpoints' config.json files alone (no weights read): cheap enough
    to run before a training run launches its ranks."""
    for path, model_types in ((text_from, TEXT_MODEL_TYPES), (image_from, IMAGE_MODEL_TYPES)):
        if path is not None:
            _checked_config(Path(path), model_types, config)


def _read_checkpoint(path: str | Path, model_types: tuple[str, ...],
                     config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of a `save_pretrained` folder, without the base-model prefix ("bert.",
    "vit."), after checking its config.json against the model's depth and heads."""
    folder = Path(path)
    prefix = f"{_checked_config(folder, model_types, config)['model_type']}."
    return {name.removeprefix(prefix): tensor for name, tensor in _read_weights(folder).items()}


def _checked_config(folder: Path, model_types: tuple[str, ...], config: ModelConfig) -> dict:
    hf_config = _read_config(folder, model_types)
    for key, ours, name in (("num_hidden_layers", config.depth, "depth"),
                            ("num_attention_heads", config.heads, "heads")):
        if hf_config.get(key) != ours:
            raise HFInitError(f"{folder}: {key} is {hf_config.get(key)}, the model's "
                              f"{name} is {ours}")
    return hf_config


def _read_config(folder: Path, model_types: tuple[str, ...]) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise HFInitError(f"{folder} has no config.json: give a folder written by a "
                          "Hugging Face model's save_pretrained")
    hf_config = json.loads(file.read_text())
    checks = [
        (hf_config.get("model_type") in model_types,
         f"model_type is {hf_config.get('model_type')!r}; this initialisation reads "
         f"{', '.join(model_types)}"),
        (hf_config.get("hidden_act", "gelu") == "gelu",
         f"hidden_act is {hf_config.get('hidden_act')!r}; the model's FFNs use exact GELU"),
        (hf_config.get("position_embedding_type", "absolute") == "absolute",
         f"position_embedding_type is {hf_config.get('position_embedding_type')!r}; the model's "
         "text positions are absolute"),
    ]
    for ok, message in checks:
        if not ok:
            raise HFInitError(f"{file}: {message}")
    return hf_config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded index, or pytorch_model.bin (weights only)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise HFInitError(f"{folder} has no model.safetensors, model.safetensors.index.json "
                      "or pytorch_model.bin")


# ---- the mapping (docs/interop.md) --------------------------------------------------------------

def _pair(target: str, source: str) -> list[Rule]:
    """A Linear's or LayerNorm's weight and bias."""
    return [Rule(f"{target}.{p}", (f"{source}.{p}",)) for p in ("weight", "bias")]


def _qkv(target: str, source: str) -> list[Rule]:
    """Separate query, key and value projections -> one fused qkv (rows: q, k, v)."""
    return [Rule(f"{target}.{p}", tuple(f"{source}.{n}.{p}" for n in ("query", "key", "value")),
                 lambda tensors, config: torch.cat(tensors)) for p in ("weight", "bias")]


def _text_positions(tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """BERT's first max_text_len positions plus its type-0 embedding (added to every token of a
    one-segment input): (1, max_text_len, width)."""
    positions, types = tensors
    return (positions[: config.max_text_len] + types[0])[None]


def _vit_rules(config: ModelConfig) -> list[Rule]:
    rules = [Rule("image_embed.cls", ("embeddings.cls_token",)),
             Rule("image_embed.pos", ("embeddings.position_embeddings",)),
             *_pair("image_embed.patch", "embeddings.patch_embeddings.projection"),
             *_pair("norm", "layernorm")]
    for i in range(config.depth):
        block, layer = f"blocks.{i}", f"encoder.layer.{i}"
        rules += [*_pair(f"{block}.norm", f"{layer}.layernorm_before"),
                  *_qkv(f"{block}.attn.qkv", f"{layer}.attention.attention"),
                  *_pair(f"{block}.attn.proj", f"{layer}.attention.output.dense"),
                  *_pair(f"{block}.ffn_v.norm", f"{layer}.layernorm_after"),
                  *_pair(f"{block}.ffn_v.fc1", f"{layer}.intermediate.dense"),
                  *_pair(f"{block}.ffn_v.fc2", f"{layer}.output.dense")]
    return rules


def _bert_rules(config: ModelConfig, shared: bool) -> list[Rule]:
    """BERT -> text embeddings, L-FFN and VL-FFN, MLM head; with `shared`, also the attention,
    its LayerNorms and the final LayerNorm."""
    rules = [Rule("text_embed.token.weight", ("embeddings.word_embeddings.weight",)),
             Rule("text_embed.pos", ("embeddings.position_embeddings.weight",
                                     "embeddings.token_type_embeddings.weight"), _text_positions),
             *_pair("mlm_head.dense", "cls.predictions.transform.dense"),
             *_pair("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
             Rule("mlm_head.decoder.bias", ("cls.predictions.bias",))]
    for i in range(config.depth):
        block, layer = f"blocks.{i}", f"encoder.layer.{i}"
        for ffn in ("ffn_l", "ffn_vl"):
            rules += [*_pair(f"{block}.{ffn}.norm", f"{layer}.attention.output.LayerNorm"),
                      *_pair(f"{block}.{ffn}.fc1", f"{layer}.intermediate.dense"),
                      *_pair(f"{block}.{ffn}.fc2", f"{layer}.output.dense")]
        if shared:  # BERT normalises each layer's input after the layer before (post-LN)
            before = "embeddings.LayerNorm" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm"
            rules += [*_pair(f"{block}.norm", before),
                      *_qkv(f"{block}.attn.qkv", f"{layer}.attention.self"),
                      *_pair(f"{block}.attn.proj", f"{layer}.attention.output.dense")]
    if shared:
        rules += _pair("norm", f"encoder.layer.{config.depth - 1}.output.LayerNorm")
    return rules
