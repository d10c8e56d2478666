"""docs/scaling.md is `vlp bench scaling`'s output: the committed page, its FLOPs, its MFU band,
the ITC gathers the projection counts and the recipe's length."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlp.models import load_config
from vlp.models.flops import flops_per_sample
from vlp.pipeline.bench.nccl_model import Cluster
from vlp.pipeline.bench.scaling import (
    checkpoint_cost,
    collective_seconds,
    contrastive_mfu,
    exposed_comm,
    itc_gathers,
    recipe_length,
    value,
)
from vlp.pipeline.bench.scaling_doc import GENERATED, fill_doc
from vlp.pipeline.cli import main
from vlp.pipeline.data.errors import UserError

PAGE = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def test_the_committed_page_is_what_the_command_generates_now(tmp_path):
    """Fails when the FLOP count, the recipe, a config or an input changed and the page was not
    regenerated (`vlp bench scaling --write-doc docs/scaling.md`)."""
    page = tmp_path / "scaling.md"
    shutil.copy(PAGE, page)
    assert main(["bench", "scaling", "--write-doc", str(page),
                 "--out", str(tmp_path / "scaling.json")]) == 0
    assert page.read_text() == PAGE.read_text()


def test_the_page_states_the_flops_the_model_counts():
    flops = flops_per_sample(load_config("base"), global_batch=64 * 512)
    inputs = next(m["body"] for m in GENERATED.finditer(PAGE.read_text()) if m["name"] == "inputs")
    assert f"**{flops / 1e9:.1f} GFLOP**" in inputs


def test_the_mfu_band_includes_the_published_contrastive_runs():
    """OpenCLIP's ViT-B/32 and B/16 on LAION-400M: 4600 and 10700 A100-hours for 32 epochs at
    14.78 and 41.09 GFLOP per forward, against the A100's 312 TFLOP/s datasheet peak."""
    mfu = contrastive_mfu()
    assert list(mfu.values()) == pytest.approx([3 * 14.78e9 * 12.8e9 / (4600 * 3600 * 312e12),
                                                3 * 41.09e9 * 12.8e9 / (10700 * 3600 * 312e12)])
    low, high = value("mfu")
    assert all(low <= round(m, 2) <= high for m in mfu.values())


def test_the_itc_gathers_are_counted_in_full_on_the_critical_path():
    """Two all-gathers and two reduce-scatters of world x batch x embed_dim x 2 bytes; no
    compute hides them."""
    calls = itc_gathers(batch=64, embed_dim=256, world=512, dtype_bytes=2)
    assert [(c.op, c.total_elements(512) * c.dtype_bytes) for c in calls] == \
        [("all_gather", 512 * 64 * 256 * 2)] * 2 + [("reduce_scatter", 512 * 64 * 256 * 2)] * 2
    cluster = Cluster(network_bus_gbs=200.0)
    alone = sum(collective_seconds(c, 512, 64, cluster) for c in calls)
    assert exposed_comm(calls, 512, 64, cluster, compute_s=10.0) == pytest.approx(alone)
    assert 4e-3 < alone < 6e-3  # ring latency on 512 ranks: about 1.2 ms a call


def test_the_recipe_length_per_node_count():
    """base_pretrain.yaml: 200,000 steps of 128 per GPU; 10 epochs of 400M at the planned batch
    (128, 128, then 64 per GPU on 64 nodes)."""
    rows = recipe_length()["by_nodes"]
    assert [round(rows[n]["recipe_epochs"], 1) for n in (1, 8, 64)] == [0.5, 4.1, 32.8]
    assert [rows[n]["max_steps_for_plan"] for n in (1, 8, 64)] == [3_906_250, 488_282, 122_071]


def test_fill_doc_replaces_each_marked_section_and_refuses_a_mismatch():
    page = ("intro\n<!-- generated: a -->\nold\n<!-- end generated -->\nmiddle\n"
            "<!-- generated: b -->\n<!-- end generated -->\n")
    assert fill_doc(page, {"a": "A1\nA2", "b": "B\n"}) == (
        "intro\n<!-- generated: a -->\nA1\nA2\n<!-- end generated -->\nmiddle\n"
        "<!-- generated: b -->\nB\n<!-- end generated -->\n")
    with pytest.raises(UserError, match="do not match"):
        fill_doc(page, {"a": "A"})  # b has no section
    with pytest.raises(UserError, match="do not match"):
        fill_doc(page, {"a": "A", "b": "B", "c": "C"})  # c has no marker


def test_a_checkpoint_costs_each_rank_its_share_at_the_measured_rate_and_the_node_its_bytes():
    """base on 512 GPUs: 12 bytes per parameter / 512 per rank, at the loopback run's rate
    (231.7 MB in 2.75 s), plus 8 ranks' bytes at 1-10 GB/s; ZeRO-2's rank 0 adds the bf16
    module (2 bytes per parameter) to its own and to its node's."""
    measured = {"bytes": 231_667_835, "save_s": 2.75}
    n = 176_400_000
    zero3 = checkpoint_cost(n, 512, 3, measured)
    share = 12 * n // 512
    rank_s = share * 2.75 / 231_667_835
    assert zero3["bytes_per_rank"] == share
    assert (zero3["save_s"].low, zero3["save_s"].high) == pytest.approx(
        (rank_s + 8 * share / 10e9, rank_s + 8 * share / 1e9))
    zero2 = checkpoint_cost(n, 512, 2, measured)
    assert zero2["bytes_per_rank"] == share + 2 * n
    assert zero2["save_s"].high == pytest.approx(
        (share + 2 * n) * 2.75 / 231_667_835 + (8 * share + 2 * n) / 1e9)
