"""The time of one NCCL collective, modelled the way NCCL's own tuner models it.

NCCL (src/graph/tuning.cc, 2.30.7) estimates every algorithm/protocol pair as

    time = latency + bytes / algorithm bandwidth

and runs the fastest. For all-gather and reduce-scatter on nodes of several GPUs that is the
ring (PAT is for one GPU per node; NVLS and CollNet across nodes need SHARP-capable switches);
all-reduce also has the tree. The ring's latency grows with every hop:

    base[p] + (ranks - nodes) x intra-node hop[p] + (nodes - 1) x network hop[p]

(ranks - 1 steps, nodes - 1 of them cross the network; inter-node rings pay at least NCCL's
network overhead per step), so a small message on 512 ranks costs hundreds of microseconds.
Bandwidth is the bus bandwidth (nccl-tests' busBW: what each link carries), converted to the
algorithm bandwidth of the collective: a ring all-gather or reduce-scatter of B bytes in all
moves B x (n-1)/n through each rank, an all-reduce twice that. Across nodes the rings leave
each node through all of its NICs, so the bus bandwidth is the node's NICs together (times an
efficiency), not one NIC per GPU. The protocols trade latency for bandwidth: LL (8-byte stores
with a flag: half the bandwidth, capped), LL128 (92%), Simple (all of it, slowest per hop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PROTOCOLS = ("LL", "LL128", "Simple")
# microseconds, from tuning.cc's ncclTunerConstantsDefaults (NCCL 2.30.7)
BASE_LATENCY = {"ring": {"LL": 6.6, "LL128": 14.0, "Simple": 8.4},
                "tree": {"LL": 6.8, "LL128": 14.0, "Simple": 8.4}}
NVLINK_HOP = {"ring": {"LL": 0.6, "LL128": 1.9, "Simple": 3.4},
              "tree": {"LL": 0.6, "LL128": 1.25, "Simple": 4.0}}
NETWORK_HOP = {"ring": {"LL": 2.7, "LL128": 4.0, "Simple": 14.0},
               "tree": {"LL": 5.0, "LL128": 8.5, "Simple": 14.0}}
NET_OVERHEAD = {"intel": 1.0, "amd": 2.0}  # per network step; x3 for Simple (getNetOverhead)
# LL's bus bandwidth cap, GB/s (llMaxBws): Hopper within a node; across 2 / more nodes by host CPU
LL_MAX_ONE_NODE = 141.0
LL_MAX_NODES = {"intel": (39.0, 20.4), "amd": (22.5, 19.0)}
LL128_SHARE = 0.92  # 120 of every 128 bytes carry data
TREE_SHARE = 0.92


@dataclass(frozen=True)
class Cluster:
    """What NCCL sees: GPUs per node and the bus bandwidth in and between nodes (GB/s)."""

    gpus_per_node: int = 8
    nvlink_bus_gbs: float = 370.0  # H100 NVLink through NCCL (nccl-tests#212)
    network_bus_gbs: float = 200.0  # ring across nodes: the node's NICs together x efficiency
    host_cpu: str = "intel"


@dataclass(frozen=True)
class Estimate:
    seconds: float
    algorithm: str
    protocol: str
    latency_s: float


def collective_time(op: str, total_bytes: float, nodes: int, cluster: Cluster) -> Estimate:
    """NCCL's fastest estimate for `op` ("all_gather", "reduce_scatter", "all_reduce") of
    `total_bytes` (an all-gather's output, a reduce-scatter's input, an all-reduce's buffer) over
    `nodes` full nodes."""
    ranks = nodes * cluster.gpus_per_node
    if ranks == 1:
        return Estimate(0.0, "none", "none", 0.0)
    algorithms = ("ring", "tree") if op == "all_reduce" else ("ring",)
    estimates = []
    for algorithm in algorithms:
        for protocol in PROTOCOLS:
            latency = latency_us(op, algorithm, protocol, ranks, nodes, cluster) * 1e-6
            bandwidth = _algorithm_bandwidth_gbs(op, algorithm, protocol, ranks, nodes, cluster)
            seconds = latency + total_bytes / (bandwidth * 1e9)
            estimates.append(Estimate(seconds, algorithm, protocol, latency))
    return min(estimates, key=lambda e: e.seconds)


def latency_us(op: str, algorithm: str, protocol: str, ranks: int, nodes: int,
                cluster: Cluster) -> float:
    intra = NVLINK_HOP[algorithm][protocol]
    inter = NETWORK_HOP[algorithm][protocol]
    if algorithm == "tree":  # up and down: hops inside the node, then log2(nodes) levels
        return BASE_LATENCY["tree"][protocol] + 2 * (
            (cluster.gpus_per_node - 1) * intra + math.log2(nodes) * inter)
    if nodes > 1:
        overhead = NET_OVERHEAD[cluster.host_cpu] * (3 if protocol == "Simple" else 1)
        intra = max(intra, overhead)
    steps, inter_steps = ranks - 1, nodes - 1
    if op == "all_reduce":  # reduce-scatter then all-gather
        steps, inter_steps = 2 * steps, (2 * (nodes - 1) if nodes > 1 else 0)
    return BASE_LATENCY["ring"][protocol] + (steps - inter_steps) * intra + inter_steps * inter


def _algorithm_bandwidth_gbs(op: str, algorithm: str, protocol: str, ranks: int, nodes: int,
                             cluster: Cluster) -> float:
    bus = cluster.nvlink_bus_gbs if nodes == 1 else cluster.network_bus_gbs
    if protocol == "LL":
        cap = LL_MAX_ONE_NODE if nodes == 1 else LL_MAX_NODES[cluster.host_cpu][nodes > 2]
        bus = min(cap, bus * 0.5 if algorithm == "ring" else bus / 3.8)
    elif protocol == "LL128":
        bus *= LL128_SHARE
    if algorithm == "tree":
        return TREE_SHARE * bus * 0.5
    steps = 2 * (ranks - 1) if op == "all_reduce" else ranks - 1
    return bus * ranks / steps
