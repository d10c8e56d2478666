"""`vlp deploy quantize`: an int8 export of a checkpoint for CPU serving.

Which layers, and how (vlp.models.quantize for the format and the kernels):
- dynamic int8 (int8 weights, activations quantized per call, int8 GEMM): every Linear layer
  the dual encoder runs (shared attention, V-FFN and L-FFN of every block, both projections);
- the VL-FFN of the fusion layers (ITM re-ranking, VQA; never the encoders) is `--fused`:
  weight_only by default: the same quarter-size storage, and at re-ranking's batch sizes the
  int8 GEMM gains little on these layers while adding a second rounding to the fused pass;
- fp32: embeddings, norms, the patch convolution, the ITM, MLM and VQA heads (small, or tied
  to the token embedding).
"""
from __future__ import annotations

from pathlib import Path

from vlp.pipeline.deploy.export import add_io_arguments

FUSED_MODES = ("weight_only", "dynamic", "fp32")


def int8_layers(model, fused: str = "weight_only") -> dict[str, str]:
    """{layer name: int8 mode} for a UnifiedModel, following the module docstring."""
    import torch.nn as nn

    if fused not in FUSED_MODES:
        raise ValueError(f"fused mode {fused!r} is not one of {FUSED_MODES}")
    layers = {}
    for name, module in model.blocks.named_modules():
        if isinstance(module, nn.Linear):
            mode = fused if ".ffn_vl." in f".{name}" else "dynamic"
            if mode != "fp32":
                layers[f"blocks.{name}"] = mode
    return layers | {"image_proj": "dynamic", "text_proj": "dynamic"}


def quantize_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                        fused: str = "weight_only") -> Path:
    """Write the int8 export of `checkpoint` (any path `load_model` takes) to `out_dir`."""
    from vlp.models.quantize import quantize_layers
    from vlp.pipeline.data.model_loading import load_float_model
    from vlp.pipeline.deploy.export import save_export

    loaded = load_float_model(checkpoint, "quantization")
    quantize_layers(loaded.model, int8_layers(loaded.model, fused))
    return save_export(loaded, out_dir)


def _cmd_quantize(args) -> int:
    out = quantize_checkpoint(args.checkpoint, args.out, args.fused)
    size = (out / "model.safetensors").stat().st_size
    print(f"int8 export of {args.checkpoint} -> {out} (weights {size / 2**20:.1f} MiB)")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "quantize", "int8 export for CPU serving (dynamic int8 Linear)",
                    ["vlp deploy quantize --checkpoint runs/tiny/checkpoints "
                     "--out export/tiny-int8"])
    add_io_arguments(p, "output export directory")
    p.add_argument("--fused", choices=FUSED_MODES, default="weight_only",
                   help="the fusion layers' VL-FFN: int8 weight-only, dynamic, or fp32")
    p.set_defaults(func=_cmd_quantize)
