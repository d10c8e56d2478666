"""The quickstart end to end at toy scale: data -> launcher training -> nightly eval (retrieval,
compositionality, VQA, captioning, classification) -> summary; then the research proxy on the
data it made."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from vlp.pipeline.cli import main as vlp

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "qs"
    code = vlp(["quickstart", "--out-dir", str(out), "--n-train", "256", "--n-test", "24",
                "--n-vqa-train", "24", "--n-vqa-val", "8", "--max-steps", "3", "--vqa-steps", "2",
                "--caption-steps", "2", "--samples-per-shard", "64"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "text->image R@1" in printed and "TensorBoard: tensorboard --logdir" in printed

    summary = json.loads((out / "quickstart_summary.json").read_text())
    metrics = {row["metric (%)"] for row in summary["results"]}
    assert {"text->image R@1 (ITC)", "text->image R@1 (ITM re-rank)", "text->image R@10 (ITC)",
            "VQA accuracy (fused)", "VQA accuracy (late fusion)", "caption CIDEr",
            "edited caption: swap_colour (ITM)", "edited caption: move (ITC)"} <= metrics
    cider = [row["baseline is"] for row in summary["results"]
             if row["metric (%)"] == "caption CIDEr"]
    assert cider == ["retrieved train caption", "most frequent train caption"]
    for row in summary["results"]:
        assert set(row) == {"metric (%)", "baseline", "baseline is", "trained (step 3)"}
    caption = json.loads((out / "runs" / "tiny_synth" / "eval" / "global_step3"
                          / "synth_caption.json").read_text())
    assert caption["finetune"]["steps"] == 2 and caption["decoding"]["beam_size"] == 3
    report = out / "runs" / "nightly" / "report.html"
    assert report.exists() and "data:image/png;base64," in report.read_text()  # plots inline
    ckpts = out / "runs" / "tiny_synth" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step3"]
    # trained with the world's edited captions as negatives
    config = json.loads((out / "runs" / "tiny_synth" / "train_config.json").read_text())
    assert config["data"]["lexicon"] == str(out / "data" / "world" / "lexicon.json")

    capsys.readouterr()
    assert vlp(["quickstart", "--out-dir", str(out)]) == 2  # refuses to mix with an old run
    assert "vlp quickstart: error:" in capsys.readouterr().err

    # The research proxy reuses that data: a short run of the recipe, retrieval, edited captions.
    script = Path(__file__).resolve().parents[1] / "launch_scripts" / "research_proxy.sh"
    env = {**os.environ, "QUICKSTART_OUT": str(out), "PROXY_STEPS": "2"}
    done = subprocess.run(["bash", str(script), "sincos_only", "data.edited_negatives=false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = (out / "proxy" / "results.jsonl").read_text().splitlines()
    [row] = [json.loads(line) for line in results]
    assert row["name"] == "sincos_only" and row["overrides"] == ["data.edited_negatives=false"]
    assert {"t2i_r1", "t2i_r1_reranked", "swap_colour/itm", "move/itc", "mean/itm"} <= set(row)
    config = json.loads((out / "proxy" / "sincos_only" / "train_config.json").read_text())
    assert config["optim"]["max_steps"] == 2 and config["data"]["edited_negatives"] is False
