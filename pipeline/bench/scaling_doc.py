"""docs/scaling.md's generated sections: the tables and summary of `vlp bench scaling`'s
projection (scaling.py), and their place on the page between `<!-- generated: NAME -->` and
`<!-- end generated -->`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from vlp.pipeline.bench.scaling import (
    CONFIGS,
    CONTRASTIVE_RUNS,
    GPUS_PER_NODE,
    INPUTS,
    NODES,
    RECIPE,
    TRANSFORMER_RUNS,
    Range,
    contrastive_mfu,
    peak_flops,
    recipe_length,
    value,
)

GENERATED = re.compile(r"(<!-- generated: (?P<name>[a-z0-9_-]+) -->\n)(?P<body>.*?)"
                       r"(<!-- end generated -->)", re.S)


def read_doc(path: str) -> str:
    from vlp.pipeline.data.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"--write-doc {path}: no such file (the page whose generated sections "
                        "this replaces, docs/scaling.md)")
    return Path(path).read_text()


def fill_doc(text: str, sections: dict[str, str], where: str = "the page") -> str:
    """`text` with the body of every `<!-- generated: NAME -->` ... `<!-- end generated -->`
    replaced by sections[NAME]; UserError for a marker with no section or a section with no
    marker (nothing generated is silently dropped)."""
    from vlp.pipeline.data.errors import UserError

    found = [match["name"] for match in GENERATED.finditer(text)]
    unknown = sorted(set(found) - set(sections))
    missing = [name for name in sections if name not in found]
    if unknown or missing or len(found) != len(set(found)):
        raise UserError(f"{where}: generated sections {found} do not match what `vlp bench "
                        f"scaling` writes, {list(sections)} (each once)")
    return GENERATED.sub(lambda m: m[1] + sections[m["name"]].rstrip("\n") + "\n" + m[4], text)


def doc_sections(projections: dict, config, trace, hooks: dict,
                 checkpoint: dict) -> dict[str, str]:
    """docs/scaling.md's generated sections, by marker name, in page order."""
    return {"summary": summary(projections, hooks),
            "inputs": inputs_table(config, trace, hooks, checkpoint),
            "mfu": mfu_table(),
            "compute": compute_table(projections),
            "recipe": recipe_table(recipe_length()),
            "collectives": collectives_table(projections, NODES[-1]),
            "nccl": nccl_table(value("network_bus_gbs")[0]),
            "steps": markdown(projections),
            "bottlenecks": bottlenecks(projections)}


def _nodes(n: int) -> str:
    return f"{n} node{'s' if n > 1 else ''}"


def summary(projections: dict, hooks: dict) -> str:
    """The summary table (step and first bottleneck per shipped config) and its conclusions."""
    out = ["| | " + " | ".join(f"{_nodes(n)} ({n * GPUS_PER_NODE} H100)" for n in NODES) + " |",
           "|---|" + "---|" * len(NODES)]
    for name in CONFIGS:
        by_nodes = projections[name]
        out.append(f"| `{name}`: step | " + " | ".join(
            _range(by_nodes[n]["step_s"], 1e3) + " ms" for n in NODES) + " |")
        out.append(f"| `{name}`: first bottleneck | " + " | ".join(
            by_nodes[n]["first_bottleneck"] for n in NODES) + " |")
    wide = {name: projections[name][NODES[-1]] for name in CONFIGS}
    best = min(CONFIGS, key=lambda name: wide[name]["gpu_hours"].mid)
    hook_ms = hooks["calls_per_step"] * hooks["mean_s"] * 1e3
    mfu_low, mfu_high = value("mfu")
    out += ["", f"- **Train `base` with `{best}`.** At {_nodes(NODES[-1])} "
                f"{value('epochs')} epochs take {_range(wide[best]['gpu_hours'], 1)} GPU-hours "
                f"against {_range(wide[best]['compute_gpu_hours'], 1)} compute-bound (scaling "
                f"efficiency {_range(wide[best]['scaling_efficiency'], 1)}); the range is mostly "
                f"the MFU band, {mfu_low:.0%}-{mfu_high:.0%}."]
    for name in CONFIGS:
        if name != best:
            p = projections[name][NODES[0]]
            out.append(f"- **`{name}`**: ZeRO-3's hooks run {hooks['calls_per_step']:,} times "
                       f"per step at {hooks['mean_s'] * 1e6:.0f} us of CPU each: {hook_ms:.0f} ms "
                       f"per step (x{value('host_factor')[0]}-{value('host_factor')[1]} on a GPU "
                       f"host), against {_range(p['compute_s'], 1e3)} ms of GPU compute at batch "
                       f"{p['batch_per_gpu']}; first bottleneck at {_nodes(NODES[-1])}: "
                       f"{wide[name]['first_bottleneck']}.")
    out.append(f"- **Exposed communication per step at {_nodes(NODES[-1])}**: " + "; ".join(
        f"{_range(wide[name]['exposed_comm_s'], 1e3)} ms with `{name}`" for name in CONFIGS)
        + f", of which the ITC loss's feature gathers take "
          f"{_range(wide[best]['itc_gather_s'], 1e3)} ms (four calls on the critical path).")
    return "\n".join(out)


def inputs_table(config, trace, hooks: dict, checkpoint: dict) -> str:
    """Every input with its value and source."""
    from vlp.models.flops import flops_per_sample
    from vlp.models.model import LossWeights

    batch = value("batch_per_gpu")[NODES[-1]] * NODES[-1] * GPUS_PER_NODE
    full = flops_per_sample(config, global_batch=batch)
    itc = flops_per_sample(config, global_batch=batch, weights=LossWeights(itc=1, itm=0, mlm=0))
    params = sum(trace.numel.values())
    low, high = value("network_bus_gbs")
    mfu_low, mfu_high = value("mfu")
    rows = [
        ("model", f"`{value('model')}`: {params / 1e6:.1f}M parameters; {config.num_patches + 1} "
                  f"image tokens, {config.max_text_len} text tokens, embed_dim "
                  f"{config.embed_dim}", INPUTS["model"][1]),
        ("FLOPs per sample, ITC+ITM+MLM, fwd+bwd",
         f"**{full / 1e9:.1f} GFLOP** (ITC alone {itc / 1e9:.1f})",
         f"`vlp.models.flops.flops_per_sample(load_config(\"base\"), global_batch={batch})`"),
        ("data", f"{value('pairs') / 1e6:.0f}M pairs, **{value('epochs')} epochs = "
                 f"{_sci(value('pairs') * value('epochs'))} samples**", INPUTS["pairs"][1]),
        ("GPU", f"H100 SXM, {peak_flops(value('gpu')) / 1e12:.0f} TFLOP/s dense bf16",
         INPUTS["gpu"][1]),
        ("MFU", f"**{mfu_low:.0%}-{mfu_high:.0%}**", INPUTS["mfu"][1]),
        ("batch", "per GPU " + ", ".join(f"{b} on {_nodes(n)}" for n, b in
                                         value("batch_per_gpu").items()),
         INPUTS["batch_per_gpu"][1]),
        ("NVLink bus bandwidth", f"{value('nvlink_bus_gbs'):.0f} GB/s",
         INPUTS["nvlink_bus_gbs"][1]),
        ("ring bus bandwidth across nodes", f"**{low:.0f}-{high:.0f} GB/s**",
         INPUTS["network_bus_gbs"][1]),
        ("ITC gather dtype", f"{value('itc_dtype_bytes')} bytes", INPUTS["itc_dtype_bytes"][1]),
        ("hook host time per call", f"{hooks['mean_s'] * 1e6:.0f} us CPU, "
                                    f"{hooks['calls_per_step']:,} calls per step",
         f"{hooks['source']} ({hooks['device']}); " + INPUTS["host_factor"][1]),
        ("JPEG decode + preprocess", f"{value('decode_per_core'):.0f} samples/s per core",
         INPUTS["decode_per_core"][1]),
        ("cores per node", f"{value('cores_per_node')}", INPUTS["cores_per_node"][1]),
        ("storage", f"{value('bytes_per_sample') / 1e3:.0f} KB/sample",
         INPUTS["bytes_per_sample"][1]),
        ("price", f"${value('price_per_gpu_hour'):.2f} per H100-hour",
         INPUTS["price_per_gpu_hour"][1]),
        ("checkpoint save per rank", f"{checkpoint['bytes'] / 1e6:.1f} MB in "
                                     f"{checkpoint['save_s']:.2f} s "
                                     f"({checkpoint['bytes'] / checkpoint['save_s'] / 1e6:.0f} "
                                     f"MB/s), every {checkpoint['every_steps']:,} steps",
         f"{checkpoint['source']} (`small`, 2 ranks on loopback); the interval: {RECIPE}"),
        ("checkpoint write per node", _range(Range(*value("node_write_gbs")), 1) + " GB/s",
         INPUTS["node_write_gbs"][1]),
    ]
    return "\n".join(["| quantity | value | source |", "|---|---|---|"]
                     + [f"| {q} | {v} | {s} |" for q, v, s in rows])


def mfu_table() -> str:
    """The published runs the MFU band rests on, each against its GPU's datasheet peak."""
    out = ["| run | GPU-hours x peak | MFU | source |", "|---|---|---:|---|"]
    for run, mfu in zip(CONTRASTIVE_RUNS, contrastive_mfu().values()):
        out.append(f"| {run['run']} | {run['gpu_hours']:,} A100-hours x "
                   f"{peak_flops(run['gpu']) / 1e12:.0f} TFLOP/s; 3 x {run['forward_gflop']} "
                   f"GFLOP x {_sci(run['samples'])} samples | **{mfu:.1%}** | {run['source']} |")
    for run, mfu, source in TRANSFORMER_RUNS:
        out.append(f"| {run} | as reported | {mfu} | {source} |")
    return "\n".join(out)


def recipe_table(length: dict) -> str:
    """The recipe's epochs per node count, and the max_steps that gives the planned ones."""
    rows = length["by_nodes"]
    out = ["| | " + " | ".join(_nodes(n) for n in NODES) + " |", "|---|" + "---:|" * len(NODES),
           f"| global batch with the recipe (optim.batch_size {length['batch_size']} x "
           f"grad_accum {length['grad_accum']} x GPUs) | "
           + " | ".join(f"{rows[n]['recipe_global_batch']:,}" for n in NODES) + " |",
           f"| epochs of {value('pairs') / 1e6:.0f}M pairs at the recipe's optim.max_steps "
           f"{length['max_steps']:,} | "
           + " | ".join(f"{rows[n]['recipe_epochs']:.1f}" for n in NODES) + " |",
           "| planned batch per GPU | " + " | ".join(str(value("batch_per_gpu")[n])
                                                   for n in NODES) + " |",
           f"| **optim.max_steps for {value('epochs')} epochs** at the planned batch | "
           + " | ".join(f"**{rows[n]['max_steps_for_plan']:,}**" for n in NODES) + " |"]
    return "\n".join(out)


def markdown(projections: dict) -> str:
    """The step and cost tables of docs/scaling.md."""
    out = []
    for name, by_nodes in projections.items():
        out += [f"**{name}**", "",
                "| | " + " | ".join(f"{_nodes(n)} ({by_nodes[n]['world']} GPUs, "
                                     f"b={by_nodes[n]['batch_per_gpu']})" for n in NODES)
                + " |",
                "|---|" + "---:|" * len(NODES)]
        rows = [("compute, ms", "compute_s", 1e3),
                ("exposed communication, ms", "exposed_comm_s", 1e3),
                ("of which the ITC gathers, ms", "itc_gather_s", 1e3),
                ("host (ZeRO-3 hooks), ms", "host_s", 1e3),
                ("checkpoint save, s", "checkpoint_save_s", 1),
                ("of it per step, ms", "checkpoint_s", 1e3), ("step, ms", "step_s", 1e3),
                ("scaling efficiency", "scaling_efficiency", 1), ("wall time, h", "wall_hours", 1),
                ("GPU-hours", "gpu_hours", 1), ("cost, $", "cost_usd", 1)]
        for label, key, scale in rows:
            out.append(f"| {label} | " + " | ".join(_range(by_nodes[n][key], scale)
                                                     for n in NODES) + " |")
        out.append("| **first bottleneck** | " + " | ".join(
            f"**{by_nodes[n]['first_bottleneck']}**" for n in NODES) + " |")
        out.append("")
    return "\n".join(out)


def bottlenecks(projections: dict) -> str:
    """The first bottleneck at each scale, per shipped config, with what comes next."""
    out = []
    for nodes in NODES:
        parts = []
        for name in CONFIGS:
            p = projections[name][nodes]
            parts.append(f"`{name}`: {p['first_bottleneck']} (scaling efficiency "
                         f"{_range(p['scaling_efficiency'], 1)}; exposed communication "
                         f"{_range(p['exposed_comm_s'], 1e3)} ms against "
                         f"{_range(p['compute_s'], 1e3)} ms of compute)")
        p = projections[CONFIGS[0]][nodes]
        out.append(f"- **{_nodes(nodes)}**: " + "; ".join(parts) + f". Data loading needs "
                   f"{p['data_cores_per_node']:.0f} of {value('cores_per_node')} cores per node "
                   f"at {value('mfu')[1]:.0%} MFU; storage {p['storage_gbs_all_nodes']:.2f} GB/s "
                   "read across all nodes.")
    return "\n".join(out)


def compute_table(projections: dict) -> str:
    """What the compute rate alone implies: GPU-hours and cost, data loading and storage."""
    by_nodes = next(iter(projections.values()))
    mfu_low, mfu_high = value("mfu")
    out = ["| | " + " | ".join(_nodes(n) for n in NODES) + " |",
           "|---|" + "---:|" * len(NODES)]
    rows = [("FLOPs per sample, G", lambda p: f"{p['flops_per_sample'] / 1e9:.1f}"),
            (f"compute-bound GPU-hours (MFU {mfu_high:.0%}-{mfu_low:.0%})",
             lambda p: _range(p["compute_gpu_hours"], 1)),
            (f"decode cores per node at {mfu_high:.0%} MFU (of {value('cores_per_node')})",
             lambda p: f"{p['data_cores_per_node']:.0f}"),
            ("storage read, all nodes, GB/s", lambda p: f"{p['storage_gbs_all_nodes']:.2f}"),
            ("object-store requests, all nodes, per s (data.read_buffer_mb=1)",
             lambda p: f"{p['storage_gbs_all_nodes'] * 1e9 / 2**20:,.0f}")]
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


def _sci(x: float) -> str:
    """4e9 and 1.28e10, not Python's 4.0e+09."""
    exponent = math.floor(math.log10(x))
    return f"{x / 10**exponent:.3g}e{exponent}"
