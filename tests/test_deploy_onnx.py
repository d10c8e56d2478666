"""ONNX encoders: `vlp deploy onnx` writes graphs ONNX Runtime runs to the torch embeddings
within the stated tolerance, and the retrieval eval takes the directory as its backend."""
import json

import pytest
import torch
from deploy_helpers import write_tiny_export

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.checkpoints import CheckpointError
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.deploy.onnx import DEFAULT_ATOL
from vlp.pipeline.eval.configs import RetrievalConfig, VQAConfig
from vlp.pipeline.eval.retrieval.job import evaluate_retrieval
from vlp.pipeline.eval.vqa.job import evaluate_vqa

pytestmark = pytest.mark.slow  # torch.onnx.export traces each graph (seconds per graph)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, world_dir):
    root = tmp_path_factory.mktemp("onnx")
    torch_export = write_tiny_export(world_dir, root / "torch")
    assert vlp(["deploy", "onnx", "--checkpoint", str(torch_export),
                "--out", str(root / "onnx")]) == 0
    return torch_export, root / "onnx"


def test_onnx_runtime_embeds_as_torch_does_within_the_tolerance(exports):
    torch_export, onnx_export = exports
    entry = json.loads((onnx_export / "config.json").read_text())["onnx"]
    assert max(entry["max_abs_difference"].values()) <= entry["atol"] == DEFAULT_ATOL
    model, encoders = load_model(torch_export).model, load_model(onnx_export).model
    # Other shapes than the export traced: 5 images, captions of 11 tokens with padding.
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    ids = torch.randint(5, model.config.vocab_size, (3, 11))
    mask = torch.arange(11)[None, :] < torch.tensor([[11], [4], [1]])
    with torch.inference_mode():
        torch.testing.assert_close(encoders.encode_image(images), model.encode_image(images),
                                   rtol=0, atol=DEFAULT_ATOL)
        torch.testing.assert_close(encoders.encode_text(ids, mask), model.encode_text(ids, mask),
                                   rtol=0, atol=DEFAULT_ATOL)


def test_retrieval_eval_runs_on_the_onnx_backend(exports, world_dir, capsys):
    torch_export, onnx_export = exports
    data = ["--karpathy-json", str(world_dir / "retrieval/dataset_synth.json"),
            "--image-root", str(world_dir / "retrieval")]
    assert vlp(["eval", "retrieval", "--checkpoint", str(onnx_export), *data]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out)["metrics"]
    reference = evaluate_retrieval(
        torch_export, RetrievalConfig(karpathy_json=data[1], image_root=data[3])
    )
    assert onnx_metrics == pytest.approx(reference["metrics"], abs=1 / 160)  # one caption of 160

    assert vlp(["eval", "retrieval", "--checkpoint", str(onnx_export), *data,
                "--rerank-k", "3"]) == 2
    assert "encoders only; ITM re-ranking" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="VQA"):
        evaluate_vqa(onnx_export, VQAConfig(vqa_dir=world_dir / "vqa", steps=1))
