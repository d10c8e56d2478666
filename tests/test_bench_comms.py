"""The communication model behind docs/scaling.md: DeepSpeed's collectives per step (predicted,
then measured on a real two-node run), NCCL's time per collective, and the hook-cost fit."""
from __future__ import annotations

import json

import pytest
import torch

from vlp.models import UnifiedModel, load_config
from vlp.pipeline.bench.common import QUICK_MODEL
from vlp.pipeline.bench.comms import fit_per_call
from vlp.pipeline.bench.nccl_model import Cluster, collective_time
from vlp.pipeline.bench.zero3_probe import _one_step_order, batch_on
from vlp.pipeline.bench.zero_traffic import (
    Collective,
    ModelTrace,
    ZeroSettings,
    step_collectives,
    summarize,
)
from vlp.pipeline.cli import main

# root owns a (1 element); m1 owns w1 (100) and b1 (4); m2 w2 (300); m3 w3 (50) and b3 (4)
TRACE = ModelTrace(
    numel={"a": 1, "w1": 100, "b1": 4, "w2": 300, "w3": 50, "b3": 4},
    forward_modules=[["a"], ["w1", "b1"], ["w2"], ["w3", "b3"]],
    grad_order=["b3", "w3", "w2", "b1", "w1", "a"],
    plain_grad_order=["w2", "b3", "w3", "b1", "w1", "a"],
    groups=[["w1", "w2", "w3"], ["a", "b1", "b3"]])


def calls(op_phase_elements, dtype_bytes=2):
    return [Collective(op, phase, n, 8 if op == "all_reduce" and phase == "step" else dtype_bytes)
            for op, phase, n in op_phase_elements]


def test_zero3_step_follows_deepspeeds_bucketing_rules():
    """Persistent a, b1, b3 (<= 4 elements) are never fetched; the root's step prefetches w1
    then w2 (reaching 150 elements), m1's step prefetches the rest (w3); gradients are cut
    before the one that would overfill 200 elements and padded to the world size (2); after the
    optimizer, the norm and one refresh per persistent parameter."""
    zero = ZeroSettings(stage=3, reduce_bucket_size=200, prefetch_bucket_size=150,
                        persistence_threshold=4)
    assert step_collectives(TRACE, zero, world=2, dtype_bytes=2) == calls([
        ("all_gather_into_tensor", "forward", 50 + 150),  # w1, w2: this rank's halves
        ("all_gather_into_tensor", "forward", 25),  # w3
        ("reduce_scatter_tensor", "backward", 4 + 50),  # b3, w3
        ("reduce_scatter_tensor", "backward", 300),  # w2 alone: it would overfill
        ("reduce_scatter_tensor", "backward", 4 + 100 + 2),  # b1, w1, a (1 padded to 2)
        ("all_reduce", "step", 1),
        ("all_gather_into_tensor", "step", 1),  # a
        ("all_gather_into_tensor", "step", 2),  # b1
        ("all_gather_into_tensor", "step", 2),  # b3
    ])


def test_zero3_without_persistent_parameters_fetches_them_in_the_buckets():
    zero = ZeroSettings(stage=3, reduce_bucket_size=10**9, prefetch_bucket_size=150,
                        persistence_threshold=0)
    assert step_collectives(TRACE, zero, world=2, dtype_bytes=2) == calls([
        ("all_gather_into_tensor", "forward", 1),  # the root's own a, needed at once
        ("all_gather_into_tensor", "forward", 50 + 2 + 150),  # w1, b1, w2
        ("all_gather_into_tensor", "forward", 25 + 2),  # w3, b3
        ("reduce_scatter_tensor", "backward", 4 + 50 + 300 + 4 + 100 + 2),
        ("all_reduce", "step", 1),
    ])


def test_zero2_all_reduces_gradient_buckets_and_gathers_each_parameter_group():
    """Plain torch's gradient order (ZeRO-2 leaves the graph alone); in bf16 the overflow flag,
    then a norm per parameter group; one all-gather per group."""
    zero = ZeroSettings(stage=2, reduce_bucket_size=200)
    assert step_collectives(TRACE, zero, world=2, dtype_bytes=2) == [
        Collective("all_reduce", "backward", 300, 2),  # w2
        Collective("all_reduce", "backward", 4 + 50 + 4 + 100 + 1, 2),  # b3, w3, b1, w1, a
        Collective("all_reduce", "step", 1, 1),
        Collective("all_reduce", "step", 1, 4), Collective("all_reduce", "step", 1, 4),
        # flat groups of 450 and 9 elements padded to multiples of 2 x world: halves of 452, 12
        Collective("all_gather_into_tensor", "step", 226, 2),
        Collective("all_gather_into_tensor", "step", 6, 2)]
    fp32 = step_collectives(TRACE, zero, world=2, dtype_bytes=4)  # no overflow check
    assert [c.bytes for c in fp32 if c.phase == "step" and c.op == "all_reduce"] == [4, 4]


def test_zero3_is_only_modelled_when_nothing_is_released_before_backward():
    with pytest.raises(ValueError, match="stage3_max_reuse_distance >= 918"):
        step_collectives(TRACE, ZeroSettings(max_reuse_distance=100), world=2, dtype_bytes=2)


def test_summary_counts_calls_and_bytes_per_op():
    summary = summarize(calls([("all_gather_into_tensor", "forward", 10),
                               ("all_gather_into_tensor", "step", 10),
                               ("reduce_scatter_tensor", "backward", 30)]))
    assert summary == {"all_gather_into_tensor": {"calls": 2, "bytes": 40, "sizes": {20: 2}},
                       "reduce_scatter_tensor": {"calls": 1, "bytes": 60, "sizes": {60: 1}}}


def test_the_zero3_probe_steps_with_inputs_on_its_models_device():
    """The probe records its order on whatever device the engine's weights are on (cuda:N under
    the launcher). On the meta device a batch built on the CPU would fail to combine with the
    weights, as it does on a GPU; here the step runs and sees every parameter."""
    with torch.device("meta"):
        model = UnifiedModel(load_config("tiny", vocab_size=64, depth=2, width=32, heads=2,
                                         fusion_layers=1, embed_dim=16))
    forward_modules, grad_order = _one_step_order(
        model, lambda batch: model(**batch)["loss"].backward(), torch.device("meta"))
    names = [name for name, _ in model.named_parameters()]
    assert sorted(grad_order) == sorted(names)
    assert set(sum(forward_modules, [])) == set(names)  # blocks are entered once per pass
    batch = batch_on(torch.device("meta"), model.config, 2, torch.bfloat16)
    assert {t.device.type for t in batch.values()} == {"meta"}
    assert batch["images"].dtype == torch.bfloat16 and batch["text_ids"].dtype == torch.long


def test_nccl_ring_latency_grows_with_every_rank():
    """tuning.cc's ring: base + (ranks - nodes) intra-node hops + (nodes - 1) network hops; a
    small message takes LL, whose intra-node hop is raised to the 1 us network overhead."""
    one_node = collective_time("all_gather", 1536, nodes=1, cluster=Cluster())
    assert (one_node.protocol, one_node.latency_s) == ("LL", pytest.approx((6.6 + 7 * 0.6) * 1e-6))
    wide = collective_time("all_gather", 1536, nodes=64, cluster=Cluster())
    assert wide.protocol == "LL"
    assert wide.latency_s == pytest.approx((6.6 + 448 * 1.0 + 63 * 2.7) * 1e-6)
    # LL across more than 2 nodes: half the bus bandwidth, capped at 20.4 GB/s (Intel hosts)
    assert wide.seconds == pytest.approx(wide.latency_s + 1536 / 20.4e9)


def test_nccl_large_messages_take_simple_at_the_bus_bandwidth():
    cluster = Cluster(network_bus_gbs=200.0)
    estimate = collective_time("reduce_scatter", 1e9, nodes=8, cluster=cluster)
    latency = (8.4 + 56 * 3.4 + 7 * 14.0) * 1e-6  # intra-node hop 3.4 > 3 x 1 us overhead
    assert (estimate.protocol, estimate.algorithm) == ("Simple", "ring")
    assert estimate.seconds == pytest.approx(latency + 1e9 * 63 / 64 / 200e9)


def test_nccl_small_all_reduce_takes_the_tree():
    estimate = collective_time("all_reduce", 8, nodes=64, cluster=Cluster())
    assert (estimate.algorithm, estimate.protocol) == ("tree", "LL")
    assert estimate.latency_s == pytest.approx((6.8 + 2 * (7 * 0.6 + 6 * 5.0)) * 1e-6)


def test_hook_cost_fit_recovers_a_known_line():
    """Calls costing 10 us + 2 us per own parameter: the fit returns exactly those."""
    data = [("f", k, 10e-6 + 2e-6 * k) for k in (0, 0, 1, 2, 2, 4)]
    fit = fit_per_call(data)
    assert fit["intercept_s"] == pytest.approx(10e-6)
    assert fit["per_parameter_s"] == pytest.approx(2e-6)
    assert fit["calls"] == 6


@pytest.mark.slow
def test_two_node_run_sends_exactly_the_predicted_collectives(tmp_path):
    """Two `vlp train` launchers on loopback with DeepSpeed's comms logger: every steady-state
    step sends the calls and message sizes the model predicts, with buckets small enough that
    the quick model fills several of each kind; then one rank times the per-module hooks."""
    ds_config = tmp_path / "small_buckets.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "overlap_comm": False, "contiguous_gradients": True,
        "reduce_bucket_size": 30000, "stage3_prefetch_bucket_size": 20000,
        "stage3_param_persistence_threshold": 1000}}))
    out = tmp_path / "comms.json"
    assert main(["bench", "comms", "--quick", "--ds-configs", str(ds_config),
                 "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    result = json.loads(out.read_text())
    measured = result["results"][str(ds_config)]
    assert result["all_match"] and measured["match"]
    assert measured["measured"] == measured["predicted"]
    assert measured["measured"]["reduce_scatter_tensor"]["calls"] > 2
    assert len(measured["measured"]["all_gather_into_tensor"]["sizes"]) > 2
    # the ITC gathers, which DeepSpeed's logger never sees: image and text embeddings, in fp32
    whole = 2 * 2 * QUICK_MODEL["embed_dim"] * 4  # world x batch x embed_dim x bytes
    itc = measured["itc_gather"]
    assert itc["measured"] == itc["predicted"] == {"forward": {"calls": 2, "bytes": 2 * whole},
                                                   "backward": {"calls": 2, "bytes": 2 * whole}}
    hooks = result["hooks"]
    kinds = hooks["per_kind"]
    entries = kinds["pre_sub_module_forward_function"]["calls_per_step"]
    assert kinds["post_sub_module_forward_function"]["calls_per_step"] == entries
    assert hooks["calls_per_step"] == sum(kind["calls_per_step"] for kind in kinds.values())
    assert hooks["fit"]["calls"] == hooks["calls_per_step"]  # one timed step in --quick


def test_projection_exposes_what_compute_cannot_hide():
    """The first two forward all-gathers, the last gradient bucket and everything after backward
    are exposed; the rest only beyond the forward (1/3) and backward (2/3) compute time."""
    from vlp.pipeline.bench.scaling import collective_seconds, exposed_comm

    zero = ZeroSettings(stage=3, reduce_bucket_size=200, prefetch_bucket_size=100,
                        persistence_threshold=4)
    step = step_collectives(TRACE, zero, world=8, dtype_bytes=2)
    cluster = Cluster()
    forward = [c for c in step if c.phase == "forward"]
    backward = [c for c in step if c.phase == "backward"]
    after = [c for c in step if c.phase == "step"]
    assert len(forward) == 3 and len(backward) == 3

    def seconds(calls):
        return sum(collective_seconds(c, 8, 1, cluster) for c in calls)

    always = seconds(forward[:2]) + seconds(backward[-1:]) + seconds(after)
    assert exposed_comm(step, 8, 1, cluster, compute_s=1.0) == pytest.approx(always)
    assert exposed_comm(step, 8, 1, cluster, compute_s=0.0) == pytest.approx(seconds(step))


CHECKPOINT = {"bytes": 1000, "save_s": 1.0, "every_steps": 100}  # a rank saves 1 kB/s


def test_projection_bounds_the_step_with_compute_communication_and_zero3_hooks():
    """1 TFLOP per sample at batch 128 on 8 nodes: compute is 128 / (MFU x 989) s; ZeRO-3 adds
    the hooks' host time (calls x seconds, x 0.5-2 when timed on a CPU only), ZeRO-2 none, and
    each a hundredth of a checkpoint save; the step's low end overlaps everything, its high end
    adds it all up; the first bottleneck is the largest middle."""
    from vlp.pipeline.bench.scaling import project, value

    def flops(config, global_batch):
        assert global_batch == 128 * 64
        return 1e12

    zero3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 200,
                                   "stage3_prefetch_bucket_size": 100,
                                   "stage3_param_persistence_threshold": 4}}
    config = load_config("tiny")
    cheap_hooks = {"calls_per_step": 1000, "mean_s": 100e-6, "device": "cpu"}  # 0.1 s a step
    p = project(TRACE, zero3, 8, config, cheap_hooks, flops, CHECKPOINT)
    mfu_low, mfu_high = value("mfu")
    compute = (128 / (mfu_high * 989), 128 / (mfu_low * 989))
    assert (p["compute_s"].low, p["compute_s"].high) == pytest.approx(compute)
    assert (p["host_s"].low, p["host_s"].high) == pytest.approx((0.05, 0.2))
    comm = p["exposed_comm_s"]
    save = p["checkpoint_s"]  # one save of 12 bytes x 459 parameters / 64 per 100 steps
    assert save.low == pytest.approx((12 * 459 // 64) / 1e3 / 100, rel=1e-3)
    assert p["step_s"].low == pytest.approx(compute[0] + comm.low + save.low)
    assert p["step_s"].high == pytest.approx(compute[1] + comm.high + 0.2 + save.high)
    assert p["first_bottleneck"] == "GPU compute"
    assert p["wall_hours"].high == pytest.approx(4e9 / (64 * 128 / p["step_s"].high) / 3600)

    slow_hooks = {"calls_per_step": 1000, "mean_s": 1e-3, "device": "cpu"}  # > the compute
    p = project(TRACE, zero3, 8, config, slow_hooks, flops, CHECKPOINT)
    assert p["step_s"].low == pytest.approx(0.5 + save.low)  # the host, running ahead, sets it
    assert p["first_bottleneck"] == "host (ZeRO-3 hooks)"

    timed_on_a_gpu_host = project(TRACE, zero3, 8, config, dict(slow_hooks, device="cuda"),
                                  flops, CHECKPOINT)
    assert (timed_on_a_gpu_host["host_s"].low, timed_on_a_gpu_host["host_s"].high) == (1.0, 1.0)

    zero2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 200}}
    p = project(TRACE, zero2, 8, config, slow_hooks, flops, CHECKPOINT)
    assert (p["host_s"].low, p["host_s"].high) == (0.0, 0.0)
    assert p["first_bottleneck"] == "GPU compute"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2"], "--steps 2: the steady state starts at step 3"),
    (["--ds-configs", "", "--hook-steps", "0"], "nothing to measure"),
    (["--hooks-ds-config", "zero2_bf16.json"], "is not a ZeRO-3 config"),
])
def test_bad_comms_arguments_fail_before_any_work(tmp_path, capsys, argv, message):
    assert main(["bench", "comms", *argv, "--out", str(tmp_path / "comms.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlp bench comms: error: ") and message in err
    assert not list(tmp_path.iterdir())  # no shards written, no launcher started
