"""`vlp bench compress --quick`: every built-in variant and a given one measured in one run, the
deltas taken against the fp32 row."""
import json
from pathlib import Path

import pytest
from deploy_helpers import write_tiny_export
from test_bench import run_bench

from vlp.pipeline.cli import main as vlp


@pytest.mark.slow  # it builds an ONNX export
def test_compress_quick_measures_each_export_against_fp32(tmp_path, world_dir):
    source = write_tiny_export(world_dir, tmp_path / "fp32")
    student = write_tiny_export(world_dir, tmp_path / "student", width=32)
    assert vlp(["deploy", "quantize", "--checkpoint", str(source), "--out",
                str(tmp_path / "int8_fused_dynamic"), "--fused", "dynamic"]) == 0
    result = run_bench(tmp_path, "compress", "--checkpoint", str(source),
                       "--karpathy-json", str(world_dir / "retrieval/dataset_synth.json"),
                       "--image-root", str(world_dir / "retrieval"), "--student", str(student),
                       "--variant", f"fused_dynamic={tmp_path / 'int8_fused_dynamic'}",
                       "--work-dir", str(tmp_path / "work"))
    rows = result["rows"]
    assert list(rows) == ["fp32", "int8", "pruned50", "onnx", "student (distilled)",
                          "fused_dynamic"]
    assert rows["int8"]["bytes"] < 0.6 * rows["fp32"]["bytes"]
    weights = {name: (Path(rows[name]["path"]) / "model.safetensors").stat().st_size
               for name in ("fp32", "pruned50")}
    assert weights["pruned50"] == weights["fp32"]  # zeros keep the dense shapes
    config = json.loads((tmp_path / "work/pruned/config.json").read_text())
    assert config["pruning"]["sparsity"] == 0.5
    # ONNX Runtime computes the same embeddings: recalls equal to within one of 160 captions.
    assert rows["onnx"]["t2i_r1"] == pytest.approx(rows["fp32"]["t2i_r1"], abs=100 / 160)
    for row in rows.values():
        assert all(speed > 0 for speed in row["speed"].values())
    delta = result["targets"]["int8_t2i_r1_delta"]["value"]
    assert delta == pytest.approx(rows["int8"]["t2i_r1"] - rows["fp32"]["t2i_r1"])
    assert "pruned_recovered_t2i_r1_delta" not in result["targets"]  # no --recovered given
