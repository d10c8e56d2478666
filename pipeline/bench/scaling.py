"""`vlp bench scaling`: the projection in docs/scaling.md, computed; `--write-doc` writes it there.

Pretraining `base` on 400M pairs on 1, 8 and 64 nodes of 8 H100s, per DeepSpeed config, as
ranges. Per step and GPU:

    compute   batch x FLOPs per sample / (MFU x peak); peak: the GPU's dense bf16 datasheet
              figure (vlp.pipeline.train.peak_flops, the peak training's MFU divides by), MFU
              from the published contrastive runs (low) to below the dense-transformer runs (high)
    comm      the collectives vlp.pipeline.bench.zero_traffic predicts for `base` (counts and
              sizes checked against DeepSpeed's own comms logger by `vlp bench comms`), each timed
              by vlp.pipeline.bench.nccl_model; only the part compute cannot hide is added:
              ZeRO-3's first two forward all-gathers (nothing to overlap them with), its last
              gradient bucket, everything after backward (the norm, ZeRO-3's persistent-parameter
              refresh, ZeRO-2's parameter all-gather), whatever the overlapped rest needs beyond
              the forward (1/3 of compute) or backward (2/3) time, and the ITC loss's feature
              gathers in full (forward all-gather, backward reduce-scatter: the loss and the ITM
              negatives wait for them, and they bypass deepspeed.comm)
    host      ZeRO-3's per-module hooks: hook calls per step x the per-call host CPU time that
              `vlp bench comms` measures (`--comms-json`), x0.5-2 if it was timed on a CPU-only
              machine (INPUTS["host_factor"]), as measured if on a GPU host
    checkpoint  the save every checkpoint.every_steps of the recipe, spread over its steps: each
              rank writes 12 bytes per parameter / world (ZeRO-1/2's rank 0 also the bf16 module;
              vlp.pipeline.bench.comms.checkpoint_bytes, checked against the files a loopback run
              wrote), at the rate a rank saved at there (serialising, hashing, writing) plus its
              node's share of INPUTS["node_write_gbs"]; training waits for it
    step      low: max(compute + comm, host) + checkpoint, everything optimistic (the host runs
              ahead of the GPU); high: compute + comm + host + checkpoint, everything pessimistic

The first bottleneck at a scale is the largest of compute, exposed communication and host time
at the middle of the ranges. Data loading (cores per node) and storage (aggregate read rate)
follow from the compute rate. Every input is in INPUTS with its source. docs/scaling.md's tables
are this module's output, written by scaling_doc.py: each sits between
`<!-- generated: NAME -->` and `<!-- end generated -->`, and `--write-doc` replaces them (tests
check the committed page).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.bench.common import environment, out_path, write_json

NODES = (1, 8, 64)
GPUS_PER_NODE = 8
CONFIGS = ("zero3_bf16.json", "zero2_bf16.json")
PREVIOUS = "zero3_bf16.json (previous settings)"
# the persistence threshold and reduce bucket zero3_bf16.json shipped with before, for comparison
PREVIOUS_ZERO3 = {"stage3_param_persistence_threshold": 100_000, "reduce_bucket_size": 500_000_000}
RECIPE = "base_pretrain.yaml"
# hook CPU time per call (mean of 3 steps) and calls per step, `vlp bench comms` on `small` (the
# same modules as base), 2-core AMD EPYC, 2026-11-30 (docs/scaling.md); --comms-json replaces them
MEASURED_HOOKS = {"calls_per_step": 1498, "mean_s": 87.1e-6}
# one rank's checkpoint save, `vlp bench comms --ds-configs zero3_cpu.json,zero2_cpu.json` on
# `small` (38.6M parameters, bf16), 2 ranks on loopback, 2026-12-06; --comms-json replaces it
MEASURED_CHECKPOINT = {"bytes": 231_667_835, "save_s": 2.75}
INPUTS = {
    "model": ("base", "models/configs/base.json: ViT-B/16 + BERT-base widths"),
    "pairs": (400e6, "LAION-400M's size (assumption)"),
    "epochs": (10, "plan"),
    "gpu": ("NVIDIA H100 80GB HBM3", "H100 SXM as torch.cuda names it; its dense bf16 peak is "
                                     "the datasheet table's (vlp/pipeline/train/peak_flops.py)"),
    "mfu": ((0.11, 0.35), "low: OpenCLIP's ViT-B/32 and B/16 on LAION-400M, 11% and 13% (the "
                          "contrastive runs measured, MFU table); high: below the "
                          "dense-transformer runs on H100s (33-39%), whose matmuls are wider"),
    "batch_per_gpu": ({1: 128, 8: 128, 64: 64}, "choice: 64 on 64 nodes keeps CLIP's global "
                                                "batch of 32,768"),
    "nvlink_bus_gbs": (370.0, "NCCL's effective H100 NVLink bandwidth (NVIDIA/nccl-tests#212)"),
    "network_bus_gbs": ((200.0, 330.0), "8 x 400 Gb/s NICs per node = 400 GB/s; 200 measured "
                                        "for all-gather on 32 x 8 H100s (NVIDIA/nccl#1218); 330 "
                                        "at NCCL's NVLink efficiency (370 of 450, nccl-tests#212)"),
    "itc_dtype_bytes": (4, "the ITC embeddings in fp32, whatever the engine's dtype (they are "
                           "normalised in fp32: vlp.models.model)"),
    "host_factor": ((0.5, 2.0), "hook CPU time on a GPU host vs a CPU-only measurement: x0.5 on "
                                "a host core twice as fast, x2 for the CUDA stream/event calls "
                                "DeepSpeed's CPU accelerator skips (assumption; 1 when the hooks "
                                "were timed on a GPU host)"),
    "decode_per_core": (300.0, "JPEG decode+preprocess per core, planned (bench loader measured "
                               "683 median, 286 loaded; docs/benchmarks.md)"),
    "cores_per_node": (112, "DGX H100 (2 x 56 cores)"),
    "bytes_per_sample": (25e3, "img2dataset 256 px shards, q95 (assumption; synthetic 18.7 KB)"),
    "price_per_gpu_hour": (3.0, "assumption"),
    "node_write_gbs": ((1.0, 10.0), "checkpoint writes of one node to shared storage: one NFS "
                                    "client to a parallel file system client on a 100 Gb/s link "
                                    "(assumption)"),
}
# Published contrastive runs: MFU = 3 x forward FLOPs per sample x samples / (GPU-hours x 3,600 x
# the GPU's datasheet peak), forward FLOPs from OpenCLIP's docs/model_profile.csv.
CONTRASTIVE_RUNS = (
    {"run": "OpenCLIP ViT-B/32, LAION-400M, 32 epochs", "gpu": "NVIDIA A100-SXM4-40GB",
     "gpu_hours": 4600, "forward_gflop": 14.78, "samples": 32 * 400e6,
     "source": "mlfoundations/open_clip docs/PRETRAINED.md: 128 A100s for ~36 h, 4600 "
               "GPU-hours; docs/model_profile.csv: 14.78 GFLOP"},
    {"run": "OpenCLIP ViT-B/16, LAION-400M, 32 epochs", "gpu": "NVIDIA A100-SXM4-40GB",
     "gpu_hours": 10700, "forward_gflop": 41.09, "samples": 32 * 400e6,
     "source": "mlfoundations/open_clip docs/PRETRAINED.md: 176 A100s for ~61 h, 10700 "
               "GPU-hours; docs/model_profile.csv: 41.09 GFLOP"},
)
# Published dense-transformer runs on H100s, MFU as reported (against the same datasheet peak).
TRANSFORMER_RUNS = (
    ("torchtitan Llama 3.1 8B, FSDP, 8 and 128 H100s, 8192 tokens", "33-39%",
     "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (without and with "
     "torch.compile)"),
    ("llm-foundry MPT-760m, 8 H100s, 512-2048 tokens", "34.9-40.4%",
     "mosaicml/llm-foundry scripts/train/benchmarking/README.md, \"H100 80GB BF16\""),
)
def value(key: str):
    return INPUTS[key][0]


def add_arguments(p) -> None:
    p.add_argument("--comms-json", help="a `vlp bench comms` result for the hook cost "
                                        "(default: the measurement recorded in this module)")
    p.add_argument("--write-doc", metavar="PATH",
                   help="replace the generated sections of this page (docs/scaling.md) with "
                        "this run's tables")


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

    from vlp.pipeline.bench.scaling_doc import doc_sections, fill_doc, read_doc

    doc = read_doc(args.write_doc) if args.write_doc else None
    config = load_config(value("model"))
    trace = ModelTrace(**run_probe(value("model"), {})["trace"])
    hooks, checkpoint = _hooks(args.comms_json), _checkpoint(args.comms_json)
    projections = {name: {nodes: project(trace, _ds_config(name), nodes, config, hooks,
                                         flops_per_sample, checkpoint)
                          for nodes in NODES}
                   for name in CONFIGS + (PREVIOUS,)}
    sections = doc_sections(projections, config, trace, hooks, checkpoint)
    payload = {"benchmark": "scaling", "environment": environment("cpu"),
               "inputs": {key: {"value": v, "source": s} for key, (v, s) in INPUTS.items()},
               "peak_flops": peak_flops(value("gpu")), "mfu_anchors": contrastive_mfu(),
               "hooks": hooks, "checkpoint": checkpoint,
               "projections": json.loads(json.dumps(projections, default=lambda r: vars(r)))}
    path = write_json(out_path(args, "scaling"), payload)
    for name, text in sections.items():
        print(f"<!-- {name} -->\n{text}\n")
    if doc is not None:
        Path(args.write_doc).write_text(fill_doc(doc, sections, args.write_doc))
        print(f"wrote the generated sections of {args.write_doc}")
    print(f"wrote {path}")
    return 0


def _ds_config(name: str) -> dict:
    from vlp.pipeline.train.config import find_ds_config

    if name == PREVIOUS:
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


def _checkpoint(comms_json: str | None) -> dict:
    """A rank's measured save ({"bytes", "save_s"}, the first ZeRO-3 run of a `vlp bench comms`
    result, else MEASURED_CHECKPOINT) and the recipe's checkpoint interval."""
    from vlp.pipeline.data.files import read_json
    from vlp.pipeline.train.config import load_train_config

    measured = dict(MEASURED_CHECKPOINT, source="recorded in vlp/pipeline/bench/scaling.py")
    if comms_json:
        runs = [r for r in read_json(comms_json, "vlp bench comms result")["results"].values()
                if r.get("zero_stage") == 3 and "checkpoint" in r]
        if runs:
            saved = runs[0]["checkpoint"]
            measured = {"bytes": max(saved["bytes_per_rank"]), "save_s": saved["save_s"],
                        "source": comms_json}
    return {**measured, "every_steps": load_train_config(RECIPE).checkpoint.every_steps}


def peak_flops(device_name: str) -> float:
    """The dense bf16 datasheet peak of a GPU, FLOP/s: the table MFU divides by in training."""
    import torch

    from vlp.pipeline.train.peak_flops import datasheet_tflops

    return datasheet_tflops(device_name, torch.bfloat16) * 1e12


def contrastive_mfu() -> dict[str, float]:
    """Each published contrastive run's MFU against its GPU's datasheet peak."""
    return {run["run"]: 3 * run["forward_gflop"] * 1e9 * run["samples"]
            / (run["gpu_hours"] * 3600 * peak_flops(run["gpu"]))
            for run in CONTRASTIVE_RUNS}


def itc_gathers(batch: int, embed_dim: int, world: int, dtype_bytes: int) -> list:
    """The ITC loss's collectives per step (vlp.models.losses.gather_with_grad, through
    torch.distributed.nn, not deepspeed.comm): the image and the text embeddings (batch x
    embed_dim per rank) all-gathered in forward, their gradients reduce-scattered in backward."""
    from vlp.pipeline.bench.zero_traffic import Collective

    gather = Collective("all_gather", "ITC forward", batch * embed_dim, dtype_bytes)
    scatter = Collective("reduce_scatter", "ITC backward", world * batch * embed_dim, dtype_bytes)
    return [gather, gather, scatter, scatter]


def project(trace, ds_config: dict, nodes: int, config, hooks: dict, flops_per_sample,
            checkpoint: dict) -> dict:
    from vlp.pipeline.bench.nccl_model import Cluster
    from vlp.pipeline.bench.zero_traffic import ZeroSettings, step_collectives

    zero = ZeroSettings.from_ds_config(ds_config)
    world = nodes * GPUS_PER_NODE
    batch = value("batch_per_gpu")[nodes]
    flops = flops_per_sample(config, global_batch=batch * world)
    mfu_low, mfu_high = value("mfu")
    peak = peak_flops(value("gpu"))
    compute = Range(batch * flops / (mfu_high * peak), batch * flops / (mfu_low * peak))
    itc = itc_gathers(batch, config.embed_dim, world, value("itc_dtype_bytes"))
    calls = step_collectives(trace, zero, world, dtype_bytes=2) + itc
    bw_low, bw_high = value("network_bus_gbs")
    fast = Cluster(nvlink_bus_gbs=value("nvlink_bus_gbs"), network_bus_gbs=bw_high)
    slow = Cluster(nvlink_bus_gbs=value("nvlink_bus_gbs"), network_bus_gbs=bw_low)
    comm = Range(exposed_comm(calls, world, nodes, fast, compute.low),
                 exposed_comm(calls, world, nodes, slow, compute.high))
    itc_s = Range(*(sum(collective_seconds(c, world, nodes, cluster) for c in itc)
                    for cluster in (fast, slow)))
    factor_low, factor_high = value("host_factor") if hooks["device"] == "cpu" else (1.0, 1.0)
    host_cpu = hooks["calls_per_step"] * hooks["mean_s"] if zero.stage == 3 else 0.0
    host = Range(host_cpu * factor_low, host_cpu * factor_high)
    saves = checkpoint_cost(sum(trace.numel.values()), world, zero.stage, checkpoint)
    ckpt = saves["save_s"].scaled(1 / checkpoint["every_steps"])
    step = Range(max(compute.low + comm.low, host.low) + ckpt.low,
                 compute.high + comm.high + host.high + ckpt.high)
    parts = {"GPU compute": compute.mid, "communication": comm.mid, "host (ZeRO-3 hooks)": host.mid}
    samples = value("pairs") * value("epochs")
    samples_per_s = Range(world * batch / step.high, world * batch / step.low)
    hours = Range(samples / samples_per_s.high / 3600, samples / samples_per_s.low / 3600)
    node_rate = GPUS_PER_NODE * batch / compute.low  # the data a node must deliver, at best
    return {
        "world": world, "batch_per_gpu": batch, "flops_per_sample": flops,
        "collectives": _count(calls, world), "protocols": _protocols(calls, world, nodes, slow),
        "compute_s": compute, "exposed_comm_s": comm, "itc_gather_s": itc_s, "host_s": host,
        "checkpoint_bytes_per_rank": saves["bytes_per_rank"], "checkpoint_save_s": saves["save_s"],
        "checkpoint_s": ckpt, "step_s": step,
        "scaling_efficiency": Range(*sorted((compute.high / step.high, compute.low / step.low))),
        "first_bottleneck": max(parts, key=parts.get),
        "wall_hours": hours, "gpu_hours": hours.scaled(world),
        "compute_gpu_hours": Range(samples * compute.low / batch / 3600,
                                   samples * compute.high / batch / 3600),
        "cost_usd": hours.scaled(world * value("price_per_gpu_hour")),
        "data_cores_per_node": node_rate / value("decode_per_core"),
        "storage_gbs_all_nodes": nodes * node_rate * value("bytes_per_sample") / 1e9,
    }


def checkpoint_cost(parameters: int, world: int, zero_stage: int, measured: dict) -> dict:
    """One save at `world` GPUs: the most bytes a rank writes, and its seconds: those bytes at
    the rate a rank saved at on loopback, plus the busiest node's bytes at the node write
    bandwidth (its range)."""
    from vlp.pipeline.bench.comms import checkpoint_bytes

    per_rank = checkpoint_bytes(parameters, world, zero_stage, weight_bytes=2)
    rank_s = max(per_rank) * measured["save_s"] / measured["bytes"]
    node_bytes = sum(per_rank[:GPUS_PER_NODE])  # node 0: ZeRO-1/2's rank 0 writes the module
    slow, fast = value("node_write_gbs")
    return {"bytes_per_rank": max(per_rank),
            "save_s": Range(rank_s + node_bytes / (fast * 1e9), rank_s + node_bytes / (slow * 1e9))}


def exposed_comm(calls, world: int, nodes: int, cluster, compute_s: float) -> float:
    """Seconds of communication compute cannot hide (the rules in this module's docstring)."""
    forward = [c for c in calls if c.phase == "forward"]
    backward = [c for c in calls if c.phase == "backward"]
    after = [c for c in calls if c.phase == "step"]
    itc = [c for c in calls if c.phase.startswith("ITC")]

    def seconds(group):
        return sum(collective_seconds(c, world, nodes, cluster) for c in group)

    exposed = seconds(forward[:2]) + max(0.0, seconds(forward[2:]) - compute_s / 3)
    if backward:
        exposed += seconds(backward[-1:]) + max(0.0, seconds(backward[:-1]) - 2 * compute_s / 3)
    return exposed + seconds(after) + seconds(itc)


def collective_seconds(call, world: int, nodes: int, cluster) -> float:
    return _estimate(call, world, nodes, cluster).seconds


def _estimate(call, world: int, nodes: int, cluster):
    """NCCL's estimate for one call (named as NCCL names the collective)."""
    from vlp.pipeline.bench.nccl_model import collective_time

    op = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
          "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
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


def recipe_length(recipe: str = RECIPE) -> dict:
    """The shipped recipe's run length per node count: the epochs its optim.max_steps gives, and
    the max_steps that gives the planned epochs at the planned batch."""
    from vlp.pipeline.train.config import load_train_config

    optim = load_train_config(recipe).optim
    samples = value("pairs") * value("epochs")
    rows = {}
    for nodes in NODES:
        world = nodes * GPUS_PER_NODE
        planned = value("batch_per_gpu")[nodes] * world
        rows[nodes] = {"recipe_global_batch": optim.batch_size * optim.grad_accum * world,
                       "planned_global_batch": planned,
                       "max_steps_for_plan": math.ceil(samples / planned)}
        rows[nodes]["recipe_epochs"] = (optim.max_steps * rows[nodes]["recipe_global_batch"]
                                        / value("pairs"))
    return {"recipe": recipe, "batch_size": optim.batch_size, "grad_accum": optim.grad_accum,
            "max_steps": optim.max_steps, "by_nodes": rows}


# ---- the page's sections -----------------------------------------------------------------------
