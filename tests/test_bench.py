"""`vlp bench ...` smoke tests: each benchmark's --quick mode runs through the real CLI and writes
JSON with the expected keys and positive figures. No timing assertions: speed goals are reported
by the benchmarks themselves, not tested (a shared CI machine cannot time reliably).
"""
from __future__ import annotations

import json

import pytest

from vlp.pipeline.cli import main
from vlp.pipeline.distributed import fast_bf16


def run_bench(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["bench", name, "--quick", "--out", str(out), *extra]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert {"date", "device", "torch"} <= set(result["environment"])
    return result


def test_train_quick_compares_ours_with_hf_clip(tmp_path):
    result = run_bench(tmp_path, "train")
    assert set(result["results"]) == {"hf_clip_itc", "ours_itc", "ours_full"}
    for variant in result["results"].values():
        assert variant["step_s_median"] > 0 and variant["samples_per_s"] > 0
        assert variant["mfu"] > 0 and variant["flops_per_sample"] > 0
    summary = result["summary"]
    assert summary["itc_speedup_vs_hf_clip"]["value"] > 0
    assert summary["full_step_cost_vs_itc"]["value"] > 0
    assert summary["full_step_flop_ratio"] > 1
    bf16 = fast_bf16("cpu")  # bf16 where this CPU has native bf16, else fp32
    peak = result["peak_flops"]
    assert peak["dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert result["setup"]["dtype_policy"] == ("bf16 autocast, fp32 master weights" if bf16
                                               else "fp32")
    for variant in result["results"].values():  # training's MFU definition, against that peak
        assert variant["mfu"] == pytest.approx(
            variant["flops_per_sample"] * variant["samples_per_s"] / peak["flops_per_s"])


def test_attention_quick_backends_agree(tmp_path):
    result = run_bench(tmp_path, "attention")
    cases = result["results"]
    assert {(c["dtype"], c["mask"]) for c in cases} == {
        ("fp32", "none"), ("fp32", "padding"), ("bf16", "none"), ("bf16", "padding")}
    for case in cases:
        assert case["sdpa_s_median"] > 0 and case["reference_s_median"] > 0
        assert case["speedup"] > 0
        assert case["max_abs_diff"] < (1e-4 if case["dtype"] == "fp32" else 5e-2)


def test_loader_quick_on_jpeg_shards(tmp_path):
    result = run_bench(tmp_path, "loader", "--data-dir", str(tmp_path / "shards"))
    assert (tmp_path / "shards" / "manifest.json").exists()
    assert set(result["results"]) == {"workers_0", "workers_1"}
    for entry in result["results"].values():
        assert entry["ours"]["samples_per_s_median"] > 0
        assert entry["plain"]["samples_per_s_median"] > 0
        assert entry["speedup"] > 0
    assert result["setup"]["jpeg_shard_bytes_per_sample"] > 0


def test_eval_quick_implementations_agree(tmp_path):
    result = run_bench(tmp_path, "eval")
    assert result["summary"]["recalls_identical"] is True
    for impl in ("chunked", "naive"):
        assert result["results"][impl]["seconds_median"] > 0
        assert result["results"][impl]["peak_memory_bytes_median"] >= 0
    recalls = result["results"]["chunked"]["recalls"]
    assert 0 < recalls["mean_recall"] <= 1


def test_caption_quick_cached_and_uncached_decode_the_same_tokens(tmp_path):
    result = run_bench(tmp_path, "caption")
    assert [c["length"] for c in result["results"]] == [4, 8]
    for case in result["results"]:
        assert case["same_tokens"] is True and case["tokens"] == 2 * case["length"]
        assert case["cached_tokens_per_s"] > 0 and case["uncached_tokens_per_s"] > 0
    assert result["summary"]["all_same_tokens"] is True


def test_naive_and_chunked_recalls_are_identical():
    from vlp.pipeline.bench.eval_recall import make_embeddings, naive_recalls
    from vlp.pipeline.eval.retrieval.recall import retrieval_recalls

    image_emb, text_emb, t2i = make_embeddings(300, 5, 32, noise=3.0, seed=1)
    chunked = retrieval_recalls(image_emb, text_emb, t2i, chunk=64)
    assert naive_recalls(image_emb, text_emb, t2i) == chunked
    assert 0 < chunked["text_retrieval_recall@1"] < 1  # a regime where ranks actually differ


def test_zero_worker_counts_single_process_bytes(tmp_path):
    """The worker's plain-torch mode in this process: fp32 params + grads, Adam's two moments."""
    from vlp.pipeline.bench.zero import QUICK_MODEL
    from vlp.pipeline.bench.zero_worker import main as worker

    assert worker(["--mode", "single", "--out-dir", str(tmp_path), "--config", "tiny",
                   "--overrides", json.dumps(QUICK_MODEL), "--batch", "2", "--steps", "1"]) == 0
    result = json.loads((tmp_path / "single_w1_rank0.json").read_text())
    n = result["model_parameters"]
    assert result["bytes"]["parameters"] == 4 * n
    assert result["bytes"]["optimizer_adam"] == 8 * n
    assert result["step_s_median"] > 0


@pytest.mark.slow
def test_zero_quick_two_ranks_halve_the_state_through_the_launcher(tmp_path):
    """One real `deepspeed --num_accelerators 2` launch. On one rank ZeRO-3 holds 16 bytes per
    parameter (bf16 param + bf16 grad + fp32 master + 2 fp32 Adam moments), so each of two ranks
    should hold about half of that; small parameters kept whole on every rank
    (stage3_param_persistence_threshold) and partition padding push it a little above 0.5."""
    result = run_bench(tmp_path, "zero", "--runs", "zero3:2")
    run = result["results"]["zero3_w2"]
    assert run["world_size"] == 2 and run["step_s_median"] > 0
    per_rank = [b["total"] for b in run["bytes_all_ranks"].values()]
    full = 16 * run["model_parameters"]
    assert all(0.45 < total / full < 0.6 for total in per_rank), (per_rank, full)
    assert all(run["bytes_per_rank"][k] > 0 for k in
               ("parameters", "gradients", "optimizer_master", "optimizer_adam"))


def test_rerank_quick_scores_each_distinct_pair_once_against_its_flop_bound(tmp_path):
    result = run_bench(tmp_path, "rerank")
    r = result["results"]
    # 80 caption queries x top 4 images are distinct pairs; the 16 image queries' top 4 captions
    # add only the pairs not already among them.
    assert (r["texts"], r["images"], r["k"]) == (80, 16, 4)
    assert 80 * 4 <= r["pairs"] <= 80 * 4 + 16 * 4
    assert r["flop_bound_s"] == pytest.approx(r["flops"] / r["peak_flops"])
    assert r["ratio_to_flop_bound"] == pytest.approx(r["ours_s_median"] / r["flop_bound_s"])
    assert r["goal_met"] == (r["ratio_to_flop_bound"] <= r["goal_ratio_to_flop_bound"])


def test_prep_quick_measures_both_sanitisers_and_projects_laion_400m(tmp_path):
    result = run_bench(tmp_path, "prep", "--executors", "1", "10")
    rows = {name: r["rows"] for name, r in result["results"].items()}
    assert rows == {"reference": 20_000, "ours": 20_000, "ours_4_parts": 80_000}
    rate = result["results"]["ours"]["rows_per_core_s"]
    one, ten = result["projection_400m"]
    assert one["sanitise_h"] == pytest.approx(400e6 / (rate * 16) / 3600)
    assert ten["img2dataset_download_h"] == pytest.approx(400e6 / 13_000 / 3600)
