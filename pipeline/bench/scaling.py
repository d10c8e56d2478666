"""`vlp bench scaling`: the projection in docs/scaling.md, computed.

Pretraining `base` on 400M pairs on 1, 8 and 64 nodes of 8 H100s, per DeepSpeed config, as
ranges. Per step and GPU:

    compute   batch x FLOPs per sample / (MFU x peak), MFU 25-35%
    comm      the collectives vlp.pipeline.bench.zero_traffic predicts for `base` (counts and
              sizes checked against DeepSpeed's own comms logger by `vlp bench comms`), each timed
              by vlp.pipeline.bench.nccl_model; only the part compute cannot hide is added:
              ZeRO-3's first two forward all-gathers (nothing to overlap them with), its last
              gradient bucket, everything after backward (the norm, ZeRO-3's persistent-parameter
              refresh, ZeRO-2's parameter all-gather), and whatever the overlapped rest needs
              beyond the forward (1/3 of compute) or backward (2/3) time
    host      ZeRO-3's per-module hooks: hook calls per step x the per-call host CPU time that
              `vlp bench comms` measures (`--comms-json`), x0.5-2 if it was timed on a CPU-only
              machine (INPUTS["host_factor"]), as measured if on a GPU host
    step      low: max(compute + comm, host), everything optimistic (the host runs ahead of the
              GPU); high: compute + comm + host, everything pessimistic (no overlap)

The first bottleneck at a scale is the largest of compute, exposed communication and host time
at the middle of the ranges. Data loading (cores per node) and storage (aggregate read rate)
follow from the compute rate. Every input is in INPUTS with its source.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from vlp.pipeline.bench.common import environment, out_path, write_json

NODES = (1, 8, 64)
GPUS_PER_NODE = 8
CONFIGS = ("zero3_bf16.json", "zero2_bf16.json")
# the persistence threshold and reduce bucket zero3_bf16.json shipped with before, for comparison
PREVIOUS_ZERO3 = {"stage3_param_persistence_threshold": 100_000, "reduce_bucket_size": 500_000_000}
# hook CPU time per call (mean of 3 steps) and calls per step, `vlp bench comms` on `small` (the
# same modules as base), 2-core AMD EPYC, 2026-11-30 (docs/scaling.md); --comms-json replaces them
MEASURED_HOOKS = {"calls_per_step": 1498, "mean_s": 87.1e-6}
INPUTS = {
    "model": ("base", "models/configs/base.json: ViT-B/16 + BERT-base widths"),
    "samples": (4.0e9, "10 epochs of 400M pairs (assumption)"),
    "peak_flops": (989e12, "H100 SXM dense bf16, NVIDIA datasheet"),
    "mfu": ((0.25, 0.35), "torchtitan: Llama 3.1 8B on 8-128 H100s, 33-39% "
                          "(benchmarks/llama3_h100_202412_torchtitan.md); llm-foundry: MPT-760m "
                          "on 8 H100s, 34.9-40.4% at 512-2048 tokens "
                          "(scripts/train/benchmarking/README.md); OpenCLIP ViT-B/16: 13% "
                          "(10,700 A100-hours, docs/PRETRAINED.md, x 3 x 41.09 GFLOP, "
                          "docs/model_profile.csv, x 32 epochs of 400M; 312 TFLOP/s peak); "
                          "a 768-wide model on 40-237-token sequences is below the LLMs"),
    "batch_per_gpu": ({1: 128, 8: 128, 64: 64}, "choice: 64 on 64 nodes keeps CLIP's global "
                                                "batch of 32,768"),
    "nvlink_bus_gbs": (370.0, "NCCL's effective H100 NVLink bandwidth (NVIDIA/nccl-tests#212)"),
    "network_bus_gbs": ((200.0, 330.0), "8 x 400 Gb/s NICs per node = 400 GB/s; 200 measured "
                                        "for all-gather on 32 x 8 H100s (NVIDIA/nccl#1218); 330 "
                                        "at NCCL's NVLink efficiency (370 of 450, nccl-tests#212)"),
    "host_factor": ((0.5, 2.0), "hook CPU time on a GPU host vs a CPU-only measurement: x0.5 on "
                                "a host core twice as fast, x2 for the CUDA stream/event calls "
                                "DeepSpeed's CPU accelerator skips (assumption; 1 when the hooks "
                                "were timed on a GPU host)"),
    "decode_per_core": (300.0, "JPEG decode+preprocess per core, planned (bench loader measured "
                               "683 median, 286 loaded; docs/benchmarks.md)"),
    "cores_per_node": (112, "DGX H100 (2 x 56 cores)"),
    "bytes_per_sample": (25e3, "img2dataset 256 px shards, q95 (assumption; synthetic 18.7 KB)"),
    "price_per_gpu_hour": (3.0, "assumption"),
}


def value(key: str):
    return INPUTS[key][0]


def add_arguments(p) -> None:
    p.add_argument("--comms-json", help="a `vlp bench comms` result for the hook cost "
                                        "(default: the measurement recorded in this module)")


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2

    def scaled(self, factor: float) -> Range:
        return Range(self.low * factor, self.high * factor)


def run(args) -> int:
    from vlp.models.config import load_config
    from vlp.models.flops import flops_per_sample
    from vlp.pipeline.bench.comms import run_probe
    from vlp.pipeline.bench.zero_traffic import ModelTrace

    config = load_config(value("model"))
    trace = ModelTrace(**run_probe(value("model"), {})["trace"])
    hooks = _hooks(args.comms_json)
    projections = {}
    for name in CONFIGS + ("zero3_bf16.json (previous settings)",):
        projections[name] = {nodes: project(trace, _ds_config(name), nodes, config, hooks,
                                            flops_per_sample)
                             for nodes in NODES}
    payload = {"benchmark": "scaling", "environment": environment("cpu"),
               "inputs": {key: {"value": v, "source": s} for key, (v, s) in INPUTS.items()},
               "hooks": hooks,
               "projections": json.loads(json.dumps(projections, default=lambda r: vars(r)))}
    path = write_json(out_path(args, "scaling"), payload)
    print(compute_table(projections))
    print()
    print(nccl_table(value("network_bus_gbs")[0]))
    print()
    print(collectives_table(projections, NODES[-1]))
    print()
    print(markdown(projections))
    print(f"wrote {path}")
    return 0


def _ds_config(name: str) -> dict:
    from vlp.pipeline.train.config import find_ds_config

    if name.startswith("zero3_bf16.json ("):
        ds_config = json.loads(find_ds_config("zero3_bf16.json").read_text())
        ds_config["zero_optimization"].update(PREVIOUS_ZERO3)
        return ds_config
    return json.loads(find_ds_config(name).read_text())


def _hooks(comms_json: str | None) -> dict:
    if not comms_json:
        return dict(MEASURED_HOOKS, device="cpu",
                    source="recorded in vlp/pipeline/bench/scaling.py")
    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.data.files import read_json

    measured = read_json(comms_json, "vlp bench comms result").get("hooks")
    if not measured:
        raise UserError(f"--comms-json {comms_json}: no hook timing in it (run `vlp bench comms` "
                        "with --hook-steps > 0)")
    return {"calls_per_step": measured["calls_per_step"], "mean_s": measured["fit"]["mean_s"],
            "device": measured.get("device", "cpu"), "source": comms_json}


def project(trace, ds_config: dict, nodes: int, config, hooks: dict, flops_per_sample) -> dict:
    from vlp.pipeline.bench.nccl_model import Cluster
    from vlp.pipeline.bench.zero_traffic import ZeroSettings, step_collectives

    zero = ZeroSettings.from_ds_config(ds_config)
    world = nodes * GPUS_PER_NODE
    batch = value("batch_per_gpu")[nodes]
    flops = flops_per_sample(config, global_batch=batch * world)
    mfu_low, mfu_high = value("mfu")
    compute = Range(batch * flops / (mfu_high * value("peak_flops")),
                    batch * flops / (mfu_low * value("peak_flops")))
    calls = step_collectives(trace, zero, world, dtype_bytes=2)
    bw_low, bw_high = value("network_bus_gbs")
    fast = Cluster(nvlink_bus_gbs=value("nvlink_bus_gbs"), network_bus_gbs=bw_high)
    slow = Cluster(nvlink_bus_gbs=value("nvlink_bus_gbs"), network_bus_gbs=bw_low)
    comm = Range(exposed_comm(calls, world, nodes, fast, compute.low),
                 exposed_comm(calls, world, nodes, slow, compute.high))
    factor_low, factor_high = value("host_factor") if hooks["device"] == "cpu" else (1.0, 1.0)
    host_cpu = hooks["calls_per_step"] * hooks["mean_s"] if zero.stage == 3 else 0.0
    host = Range(host_cpu * factor_low, host_cpu * factor_high)
    step = Range(max(compute.low + comm.low, host.low), compute.high + comm.high + host.high)
    parts = {"GPU compute": compute.mid, "communication": comm.mid, "host (ZeRO-3 hooks)": host.mid}
    samples_per_s = Range(world * batch / step.high, world * batch / step.low)
    hours = Range(value("samples") / samples_per_s.high / 3600,
                  value("samples") / samples_per_s.low / 3600)
    node_rate = GPUS_PER_NODE * batch / compute.low  # the data a node must deliver, at best
    return {
        "world": world, "batch_per_gpu": batch, "flops_per_sample": flops,
        "collectives": _count(calls, world), "protocols": _protocols(calls, world, nodes, slow),
        "compute_s": compute, "exposed_comm_s": comm, "host_s": host, "step_s": step,
        "scaling_efficiency": Range(*sorted((compute.high / step.high, compute.low / step.low))),
        "first_bottleneck": max(parts, key=parts.get),
        "wall_hours": hours, "gpu_hours": hours.scaled(world),
        "cost_usd": hours.scaled(world * value("price_per_gpu_hour")),
        "data_cores_per_node": node_rate / value("decode_per_core"),
        "storage_gbs_all_nodes": nodes * node_rate * value("bytes_per_sample") / 1e9,
    }


def exposed_comm(calls, world: int, nodes: int, cluster, compute_s: float) -> float:
    """Seconds of communication compute cannot hide (the rules in this module's docstring)."""
    forward = [c for c in calls if c.phase == "forward"]
    backward = [c for c in calls if c.phase == "backward"]
    after = [c for c in calls if c.phase == "step"]

    def seconds(group):
        return sum(collective_seconds(c, world, nodes, cluster) for c in group)

    exposed = seconds(forward[:2]) + max(0.0, seconds(forward[2:]) - compute_s / 3)
    if backward:
        exposed += seconds(backward[-1:]) + max(0.0, seconds(backward[:-1]) - 2 * compute_s / 3)
    return exposed + seconds(after)


def collective_seconds(call, world: int, nodes: int, cluster) -> float:
    return _estimate(call, world, nodes, cluster).seconds


def _estimate(call, world: int, nodes: int, cluster):
    """NCCL's estimate for one of DeepSpeed's calls (named as NCCL names the collective)."""
    from vlp.pipeline.bench.nccl_model import collective_time

    op = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
          "all_reduce": "all_reduce"}[call.op]
    return collective_time(op, call.total_elements(world) * call.dtype_bytes, nodes, cluster)


def _count(calls, world: int) -> dict:
    """Calls per phase and op; `bytes` as the comms logger counts them (an all-gather's input),
    `whole_bytes` the whole gathered or reduced tensors."""
    counts: dict[str, dict] = {}
    for call in calls:
        entry = counts.setdefault(f"{call.phase} {call.op}",
                                  {"calls": 0, "bytes": 0, "whole_bytes": 0})
        entry["calls"] += 1
        entry["bytes"] += call.bytes
        entry["whole_bytes"] += call.total_elements(world) * call.dtype_bytes
    return counts


def _protocols(calls, world: int, nodes: int, cluster) -> dict:
    """How NCCL would run each kind of call (the largest one of its kind), at the low bandwidth."""
    picked = {}
    for call in sorted(calls, key=lambda c: c.elements):
        estimate = _estimate(call, world, nodes, cluster)
        picked[f"{call.phase} {call.op}"] = {"bytes": call.total_elements(world) * call.dtype_bytes,
                                             "protocol": estimate.protocol,
                                             "algorithm": estimate.algorithm,
                                             "latency_us": estimate.latency_s * 1e6,
                                             "seconds": estimate.seconds}
    return picked


# ---- tables ----------------------------------------------------------------------------------

def markdown(projections: dict) -> str:
    """The step and cost tables of docs/scaling.md."""
    out = []
    for name, by_nodes in projections.items():
        out += [f"**{name}**", "",
                "| | " + " | ".join(f"{n} node{'s' if n > 1 else ''} ({by_nodes[n]['world']} "
                                     f"GPUs, b={by_nodes[n]['batch_per_gpu']})" for n in NODES)
                + " |",
                "|---|" + "---:|" * len(NODES)]
        rows = [("compute, ms", "compute_s", 1e3), ("exposed communication, ms", "exposed_comm_s",
                                                    1e3),
                ("host (ZeRO-3 hooks), ms", "host_s", 1e3), ("step, ms", "step_s", 1e3),
                ("scaling efficiency", "scaling_efficiency", 1), ("wall time, h", "wall_hours", 1),
                ("GPU-hours", "gpu_hours", 1), ("cost, $", "cost_usd", 1)]
        for label, key, scale in rows:
            out.append(f"| {label} | " + " | ".join(_range(by_nodes[n][key], scale)
                                                     for n in NODES) + " |")
        out.append("| **first bottleneck** | " + " | ".join(
            f"**{by_nodes[n]['first_bottleneck']}**" for n in NODES) + " |")
        out.append("")
    return "\n".join(out)


def compute_table(projections: dict) -> str:
    """What the compute rate alone implies: GPU-hours and cost, data loading and storage."""
    by_nodes = next(iter(projections.values()))
    out = ["| | " + " | ".join(f"{n} node{'s' if n > 1 else ''}" for n in NODES) + " |",
           "|---|" + "---:|" * len(NODES)]
    rows = [("FLOPs per sample, G", lambda p: f"{p['flops_per_sample'] / 1e9:.1f}"),
            ("compute-bound GPU-hours (MFU 35-25%)",
             lambda p: _range(Range(*(value("samples") * p["compute_s"].low / p["batch_per_gpu"],
                                      value("samples") * p["compute_s"].high / p["batch_per_gpu"])),
                              1 / 3600)),
            ("decode cores per node at 35% MFU (of 112)",
             lambda p: f"{p['data_cores_per_node']:.0f}"),
            ("storage read, all nodes, GB/s", lambda p: f"{p['storage_gbs_all_nodes']:.2f}")]
    for label, cell in rows:
        out.append(f"| {label} | " + " | ".join(cell(by_nodes[n]) for n in NODES) + " |")
    return "\n".join(out)


def collectives_table(projections: dict, nodes: int) -> str:
    """Each config's collectives per step at `nodes`, and how NCCL runs the largest of each."""
    out = ["| config | collective | calls | MB (whole tensors) | NCCL's pick for the largest "
           "| its time, ms |", "|---|---|---:|---:|---|---:|"]
    for name, by_nodes in projections.items():
        projection = by_nodes[nodes]
        for kind, count in projection["collectives"].items():
            pick = projection["protocols"][kind]
            out.append(f"| {name} | {kind} | {count['calls']} | {count['whole_bytes'] / 1e6:,.1f} "
                       f"| {pick['algorithm']} {pick['protocol']} | {pick['seconds'] * 1e3:.2f} |")
    return "\n".join(out)


def nccl_table(network_bus_gbs: float) -> str:
    """Ring all-gather on 1/8/64 nodes: each protocol's latency, and NCCL's pick per size."""
    from vlp.pipeline.bench.nccl_model import PROTOCOLS, Cluster, collective_time, latency_us

    cluster = Cluster(nvlink_bus_gbs=value("nvlink_bus_gbs"), network_bus_gbs=network_bus_gbs)
    sizes = {"1.5 KB": 1.5e3, "19 MB": 19e6, "100 MB": 100e6, "353 MB": 353e6}
    out = ["| nodes (ranks) | " + " | ".join(f"{p} latency" for p in PROTOCOLS) + " | "
           + " | ".join(sizes) + " |", "|---|" + "---:|" * (len(PROTOCOLS) + len(sizes))]
    for nodes in NODES:
        ranks = nodes * GPUS_PER_NODE
        latencies = [f"{latency_us('all_gather', 'ring', p, ranks, nodes, cluster):,.0f} us"
                     for p in PROTOCOLS]
        picks = []
        for size in sizes.values():
            estimate = collective_time("all_gather", size, nodes, cluster)
            picks.append(f"{estimate.seconds * 1e3:.2f} ms {estimate.protocol}")
        out.append(f"| {nodes} ({ranks}) | " + " | ".join(latencies + picks) + " |")
    return "\n".join(out)


def _range(r, scale: float) -> str:
    low, high = r.low * scale, r.high * scale
    digits = 2 if high < 10 else 0
    if f"{low:,.{digits}f}" == f"{high:,.{digits}f}":
        return f"{low:,.{digits}f}"
    return f"{low:,.{digits}f}-{high:,.{digits}f}"
