"""`vlp deploy onnx`: the image and text encoders as ONNX graphs, checked against torch.

The export (vlp.models.onnx_encoders for the format) is verified before it is published: ONNX
Runtime and torch embed the same probe batch (random pixels, captions of random ids and lengths)
and every embedding component must agree within `--atol` (default 1e-4; the embeddings are unit
vectors, and fp32 kernels that sum in another order differ by about 1e-6). The largest difference
seen is recorded in config.json. `vlp eval retrieval --checkpoint DIR` then runs on ONNX Runtime.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.deploy.export import add_io_arguments

DEFAULT_ATOL = 1e-4
PROBE_BATCH = 8


def probe_inputs(config, batch: int = PROBE_BATCH, seed: int = 0):
    """Random uint8 images and token ids with padded tails of random lengths (at least 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size),
                           dtype=torch.uint8, generator=generator)
    ids = torch.randint(0, config.vocab_size, (batch, config.max_text_len), generator=generator)
    lengths = torch.randint(1, config.max_text_len + 1, (batch,), generator=generator)
    mask = torch.arange(config.max_text_len)[None, :] < lengths[:, None]
    return images, ids, mask


def max_differences(model, encoders, config) -> dict[str, float]:
    """Largest |torch - onnx| embedding component, per encoder, on the probe batch."""
    import torch

    images, ids, mask = probe_inputs(config)
    with torch.inference_mode():
        image = model.encode_image(images) - encoders.encode_image(images)
        text = model.encode_text(ids, mask) - encoders.encode_text(ids, mask)
    return {"image": image.abs().max().item(), "text": text.abs().max().item()}


def export_onnx(checkpoint: str | Path, out_dir: str | Path, atol: float = DEFAULT_ATOL) -> dict:
    """Write the ONNX export of `checkpoint` to `out_dir` after checking it; returns its "onnx"
    config entry. UserError when ONNX Runtime disagrees with torch by more than `atol`."""
    from vlp.models.export import config_meta
    from vlp.models.onnx_encoders import GRAPH_FILES, OPSET, OnnxEncoders, export_encoders
    from vlp.pipeline.data.files import write_json_atomic
    from vlp.pipeline.data.model_loading import load_float_model

    loaded = load_float_model(checkpoint, "ONNX export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_encoders(loaded.model, out)
    meta = config_meta(loaded.model)
    write_json_atomic(out / "config.json", meta)
    shutil.copyfile(Path(loaded.info.path) / "tokenizer.json", out / "tokenizer.json")
    differences = max_differences(loaded.model, OnnxEncoders(out), loaded.model.config)
    if max(differences.values()) > atol:
        raise UserError(f"ONNX Runtime's embeddings differ from torch's by {differences} "
                        f"(> --atol {atol}); the export in {out} is not usable")
    meta["onnx"] = {"opset": OPSET, "graphs": GRAPH_FILES, "max_abs_difference": differences,
                    "atol": atol}
    write_json_atomic(out / "config.json", meta)
    return meta["onnx"]


def _cmd_onnx(args) -> int:
    entry = export_onnx(args.checkpoint, args.out, args.atol)
    diff = entry["max_abs_difference"]
    print(f"ONNX encoders of {args.checkpoint} -> {args.out} (opset {entry['opset']}); "
          f"max |torch - onnxruntime|: image {diff['image']:.2e}, text {diff['text']:.2e}")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "onnx", "image and text encoders as ONNX (ONNX Runtime)",
                    ["vlp deploy onnx --checkpoint runs/tiny/checkpoints --out export/tiny-onnx"])
    add_io_arguments(p, "output directory (a retrieval eval backend)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help="largest allowed embedding difference from torch")
    p.set_defaults(func=_cmd_onnx)
