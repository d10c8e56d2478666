"""The dual encoder as two ONNX graphs, run by ONNX Runtime: writing and reading the format.

An ONNX export directory holds
    image_encoder.onnx   images uint8 (B, 3, S, S)           -> image_embeds float (B, embed_dim)
    text_encoder.onnx    ids int64 (B, T), mask bool (B, T) -> text_embeds float (B, embed_dim)
    config.json          the model's config.json plus an "onnx" entry (opset, files, and the
                         largest difference from the torch embeddings measured at export)
    tokenizer.json
Embeddings are L2-normalised, as `UnifiedModel.encode_image` / `encode_text` return them; the
pixel normalisation is inside the image graph, so a server feeds decoded uint8 pixels. The batch
size and the text length (up to max_text_len) are dynamic. The fusion layers and heads are not
exported: an ONNX export serves retrieval by embeddings, not ITM re-ranking or VQA.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig

GRAPH_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
OPSET = 18


class _ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids, mask)


def export_encoders(model: nn.Module, out_dir: str | Path) -> dict[str, Path]:
    """Write the two graphs of `model` (a UnifiedModel, on the CPU) to `out_dir` with
    torch.onnx.export (the torch.export-based exporter); returns {"image": path, "text": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, batch = model.config, torch.export.Dim("batch", min=1)
    images = torch.zeros(2, 3, config.image_size, config.image_size, dtype=torch.uint8)
    ids = torch.zeros(2, config.max_text_len, dtype=torch.long)
    mask = torch.ones(2, config.max_text_len, dtype=torch.bool)
    length = torch.export.Dim("length", min=1, max=config.max_text_len)
    graphs = {
        "image": (_ImageEncoder(model), (images,), ["images"], {"images": {0: batch}}),
        "text": (_TextEncoder(model), (ids, mask), ["ids", "mask"],
                 {"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}),
    }
    paths = {}
    model.eval()
    for name, (module, args, inputs, shapes) in graphs.items():
        paths[name] = out / GRAPH_FILES[name]
        # The exporter narrates its steps on stdout and warns about torch internals.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(paths[name]), input_names=inputs,
                              output_names=[f"{name}_embeds"], dynamic_shapes=shapes,
                              opset_version=OPSET, dynamo=True, external_data=False)
    return paths


class OnnxEncoders:
    """`encode_image` / `encode_text` of an ONNX export directory through ONNX Runtime sessions,
    taking and returning torch tensors like the UnifiedModel methods (on the CPU)."""

    device = torch.device("cpu")

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        import onnxruntime as ort

        directory = Path(model_dir)
        meta = json.loads((directory / "config.json").read_text())
        self.config = ModelConfig.from_dict(
            {k: v for k, v in meta.items() if k in ModelConfig.__dataclass_fields__})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.image_session, self.text_session = (
            ort.InferenceSession(str(directory / GRAPH_FILES[name]), options, providers=providers)
            for name in ("image", "text"))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 pixels -> (B, embed_dim) normalised embeddings."""
        pixels = images.cpu().to(torch.uint8).numpy()
        return torch.from_numpy(self.image_session.run(None, {"images": pixels})[0])

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, embed_dim) normalised embeddings."""
        feed = {"ids": ids.cpu().long().numpy(), "mask": mask.cpu().bool().numpy()}
        return torch.from_numpy(self.text_session.run(None, feed)[0])

    def eval(self) -> OnnxEncoders:
        return self
