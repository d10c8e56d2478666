"""Magnitude pruning: masks, the masked Linear layer that keeps pruned weights at zero while
training, and the pruning record of an export.

Pruning is permanent in the weights (pruned entries are stored as exact zeros); config.json
says what was pruned:

    "pruning": {"method": "magnitude", "scope": "global", "target_sparsity": 0.5,
                "sparsity": 0.5, "layers": ["blocks.0.attn.qkv", ...]}

A fine-tune of a pruned model wraps those layers in `MaskedLinear`, whose forward multiplies the
weight by its fixed mask: a pruned weight gets exactly zero gradient, so AdamW (zero moments, and
decay of a zero weight) leaves it at exactly zero. The mask acts inside forward, where ZeRO-3 has
gathered the weight, and is a non-persistent buffer, so parameter names, checkpoints and exports
are those of the plain model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCOPES = ("global", "layer")
_RECORD_ATTR = "_pruning_record"


def prunable_layers(model: nn.Module) -> list[str]:
    """The Linear layers of the transformer blocks (attention and every expert FFN): nearly all
    of the weights; embeddings, norms, projections and heads stay dense."""
    return [f"blocks.{name}" for name, module in model.blocks.named_modules()
            if isinstance(module, nn.Linear)]


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) that zero the `sparsity` fraction of smallest-|w| entries, over
    all `weights` together ("global") or within each ("layer"); ties at the threshold are kept."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"pruning scope {scope!r} is not one of {SCOPES}")
    if scope == "layer":
        return {name: _keep_above(w.abs(), _threshold(w.abs().flatten(), sparsity))
                for name, w in weights.items()}
    threshold = _threshold(torch.cat([w.abs().flatten() for w in weights.values()]), sparsity)
    return {name: _keep_above(w.abs(), threshold) for name, w in weights.items()}


def _threshold(magnitudes: torch.Tensor, sparsity: float) -> float | None:
    """The k-th smallest magnitude, k = round(sparsity * n); None when nothing is pruned."""
    k = round(sparsity * magnitudes.numel())
    return None if k == 0 else magnitudes.float().kthvalue(k).values.item()


def _keep_above(magnitude: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return magnitude > threshold


def prune(model: nn.Module, sparsity: float, scope: str = "global",
          layers: list[str] | None = None) -> dict:
    """Zero the smallest weights of `layers` (default `prunable_layers`) in place; records and
    returns the pruning record."""
    layers = layers or prunable_layers(model)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach() for name in layers}
    masks = magnitude_masks(weights, sparsity, scope)
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)
    record = {"method": "magnitude", "scope": scope, "target_sparsity": sparsity,
              "sparsity": zero_fraction(model, layers), "layers": layers}
    set_pruning_record(model, record)
    return record


def zero_fraction(model: nn.Module, layers: list[str]) -> float:
    """Share of exactly-zero weights over the named layers (their sparsity)."""
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in layers)
    return zeros / sum(modules[n].weight.numel() for n in layers)


def pruning_record(model: nn.Module) -> dict | None:
    """The pruning record the model was built or pruned with (None: not pruned)."""
    return getattr(model, _RECORD_ATTR, None)


def set_pruning_record(model: nn.Module, record: dict | None) -> None:
    """Attach the record config.json carries (kept beside the model: pruned layers are plain
    Linear layers holding zeros, so the modules themselves cannot tell)."""
    if record is not None:
        layers = record.get("layers") if isinstance(record, dict) else None
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"pruning record {record!r} has no list of layer names")
    setattr(model, _RECORD_ATTR, record)


class MaskedLinear(nn.Linear):
    """An nn.Linear computing with `weight * weight_mask`; it takes over an existing layer's
    Parameters (no new weight is allocated, names unchanged)."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight_mask", mask.to(torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_mask, self.bias)


def keep_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Wrap each named Linear layer of `model` in a MaskedLinear with its keep-mask (in place)."""
    for name, mask in masks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"pruned layer {name!r} is not a Linear layer of this model")
        if tuple(mask.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the layer "
                             f"{(linear.out_features, linear.in_features)}")
        model.set_submodule(name, MaskedLinear(linear, mask.to(linear.weight.device)))


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of a pruned model's recorded layers: True where the weight is not zero."""
    record = pruning_record(model)
    if record is None:
        return {}
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() != 0 for name in record["layers"]}
