"""int8 Linear layers: the module, the conversion of a model, and its record in an export.

Weights are int8, symmetric, one fp32 scale per output channel (w ~ q * scale, q in [-127, 127]),
stored as plain tensors (`weight` int8, `weight_scale` fp32, `bias` fp32), so an export stays a
safetensors file of named tensors and config.json names the converted layers:

    "quantization": {"scheme": "int8-per-channel-symmetric", "layers": {"blocks.0.attn.qkv":
                     "dynamic", "blocks.3.ffn_vl.fc1": "weight_only", ...}}

Two ways to compute with them:
- "dynamic": on the CPU each input is quantized per call and the product runs on torch's int8
  GEMM, the fbgemm/x86 kernel behind `quantized::linear_dynamic` (what the deprecated
  `torch.ao.quantization.quantize_dynamic` calls). In torch 2.13 it is the only int8 GEMM that is
  fast in eager mode on x86: torchao's `Int8DynamicActivationInt8WeightConfig`, the supported
  successor, is about 10x slower than fp32 in eager mode on an AVX2 CPU (its int8 matmul needs
  torch.compile, about 100 s per input shape here). Activations use 7 bits (`reduce_range`):
  AVX2's u8 x s8 multiply-add saturates int16 with 8.
- "weight_only": the weight is dequantized per call and the product is an fp32 GEMM: a quarter
  of the storage, fp32's speed.
Elsewhere (CUDA, ONNX export, or when the input needs a gradient, as in a VQA fine-tune of the
backbone) a dynamic layer computes like a weight-only one, so every export runs everywhere.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEME = "int8-per-channel-symmetric"
MODES = ("dynamic", "weight_only")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)): q = round(w / scale), scale =
    max|row| / 127 (an all-zero row, e.g. a pruned one, gets scale 1 and stays zero)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear layer holding int8 weights; `mode` is "dynamic" or "weight_only" (module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"int8 mode {mode!r} is not one of {MODES}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: tuple | None = None  # (weight version, fbgemm's packed weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode)
        layer.weight, layer.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().float().clone())
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.mode == "dynamic" and x.device.type == "cpu" and x.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.onnx.is_in_onnx_export()):
            return torch.ops.quantized.linear_dynamic(x, self._packed_weight(), True)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _packed_weight(self):
        """fbgemm's prepacked weight and bias (added inside the GEMM's output pass), built on
        first use and again if either changes (a fine-tune trains the bias)."""
        version = (self.weight.data_ptr(), self.weight._version,
                   None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        if self._packed is None or self._packed[0] != version:
            with warnings.catch_warnings():
                # torch marks its quantized dtypes deprecated (pytorch#184982); fbgemm's packing
                # still takes one, and it is built here from the stored int8 values, unrounded.
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.weight_scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = None if self.bias is None else self.bias.detach().float()
                packed = torch.ops.quantized.linear_prepack(qweight, bias)
            self._packed = (version, packed)
        return self._packed[1]

    def __getstate__(self):  # deepcopy / pickle: the packed weight is rebuilt on first use
        return {**super().__getstate__(), "_packed": None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def quantize_layers(model: nn.Module, layers: dict[str, str]) -> nn.Module:
    """Replace each named nn.Linear of `model` by an Int8Linear in the given mode (in place)."""
    for name, mode in layers.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        model.set_submodule(name, Int8Linear.from_linear(linear, mode))
    return model


def quantization_record(model: nn.Module) -> dict | None:
    """The config.json entry describing the model's int8 layers (None: it has none)."""
    layers = {name: module.mode for name, module in model.named_modules()
              if isinstance(module, Int8Linear)}
    return {"scheme": SCHEME, "layers": layers} if layers else None


def apply_quantization_record(model: nn.Module, record: dict) -> None:
    """Give a freshly built model the int8 layers a record names, before its weights are loaded;
    ValueError for another scheme, an unknown mode or a layer the model does not have."""
    if not isinstance(record, dict) or record.get("scheme") != SCHEME:
        raise ValueError(f"quantization scheme {record!r}: this code reads {SCHEME!r}")
    layers = record.get("layers")
    if not isinstance(layers, dict) or not all(mode in MODES for mode in layers.values()):
        raise ValueError(f"quantization layers must map layer names to one of {MODES}")
    modules = dict(model.named_modules())
    for name, mode in layers.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized layer {name!r} is not a Linear layer of this model")
        model.set_submodule(name, Int8Linear(linear.in_features, linear.out_features,
                                             linear.bias is not None, mode))

