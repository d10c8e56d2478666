"""The collectives DeepSpeed ZeRO issues in one steady-state training step, predicted.

Read from DeepSpeed 0.19's code, for a model whose passes run in a fixed order (ours):

ZeRO-3 (runtime/zero/stage3.py, partitioned_param_coordinator.py, partition_parameters.py)
  forward   `all_gather_into_tensor`: when a module is entered, one call for its own parameters
            that are not yet resident, then one prefetch call taking parameters in first-use
            order until it holds `stage3_prefetch_bucket_size` elements. Parameters at or below
            `stage3_param_persistence_threshold` elements stay resident and are never fetched.
            With `stage3_max_reuse_distance` above the step's parameter traffic (the shipped
            configs: 1e9) nothing is released before backward, so backward fetches nothing.
  backward  `reduce_scatter_tensor` per gradient bucket: gradients join in the order they become
            ready; a bucket goes when the next gradient would take it past `reduce_bucket_size`
            elements, the last one at the end of backward (with nothing left to overlap it).
  step      `all_reduce` of the gradient norm (one fp64), then one `all_gather_into_tensor` per
            persistent parameter (`_post_step` refreshes their full copies one call each).
ZeRO-1/2 (runtime/zero/stage_1_and_2.py)
  backward  `all_reduce` per gradient bucket (same bucketing; `use_multi_rank_bucket_allreduce`),
            in plain torch's gradient order (no ZeRO-3 graph changes).
  step      in bf16/fp16 the overflow flag (one byte; bf16's check_grad_overflow defaults on),
            the gradient norm of each optimizer parameter group (one fp32 each), then one
            `all_gather_into_tensor` per group, of the updated flat partition.

Message sizes are what DeepSpeed's comms logger records (vlp.pipeline.train.comms): for an
all-gather this rank's input (each parameter's partition, ceil(numel / world) elements), for a
reduce-scatter or all-reduce the whole input (reduce-scatter pads each gradient to a multiple of
the world size). The module and gradient order come from a narrow twin of the model run under
ZeRO-3 (vlp.pipeline.bench.zero3_probe); the sizes from the real config built on the meta device.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

NORM_BYTES = {3: 8, 2: 4}  # the gradient norm DeepSpeed all-reduces: fp64 (stage 3), fp32 (1-2)


@dataclass(frozen=True)
class Collective:
    op: str  # DeepSpeed's name: all_gather_into_tensor, reduce_scatter_tensor, all_reduce
    phase: str  # forward, backward, step (ITC forward / ITC backward: bench.scaling.itc_gathers)
    elements: int  # the message as the comms logger sizes it, in elements
    dtype_bytes: int

    @property
    def bytes(self) -> int:
        return self.elements * self.dtype_bytes

    def total_elements(self, world: int) -> int:
        """Elements of the whole collective (an all-gather's output: input x world)."""
        return self.elements * world if self.op.startswith("all_gather") else self.elements


@dataclass(frozen=True)
class ZeroSettings:
    """The `zero_optimization` keys that decide what is sent (DeepSpeed's defaults)."""

    stage: int = 3
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> ZeroSettings:
        zero = ds_config.get("zero_optimization", {})
        keys = {"stage": "stage", "reduce_bucket_size": "reduce_bucket_size",
                "prefetch_bucket_size": "stage3_prefetch_bucket_size",
                "persistence_threshold": "stage3_param_persistence_threshold",
                "max_live_parameters": "stage3_max_live_parameters",
                "max_reuse_distance": "stage3_max_reuse_distance"}
        return cls(**{field: int(zero[key]) for field, key in keys.items() if key in zero})


@dataclass
class ModelTrace:
    """One ZeRO-3 step of a model, as vlp.pipeline.bench.zero3_probe records it."""

    numel: dict[str, int]  # parameter -> elements, in registration (DeepSpeed ds_id) order
    forward_modules: list[list[str]]  # each module entered in forward: its own parameters
    grad_order: list[str]  # parameters in the order their gradients become ready under ZeRO-3
    plain_grad_order: list[str]  # the same without ZeRO-3's graph changes (ZeRO-1/2)
    groups: list[list[str]]  # optimizer parameter groups (vlp.pipeline.train.optim)


def step_collectives(trace: ModelTrace, zero: ZeroSettings, world: int,
                     dtype_bytes: int) -> list[Collective]:
    """Every collective of one steady-state step, in issue order."""
    if zero.stage == 3:
        return _zero3(trace, zero, world, dtype_bytes)
    if zero.stage in (1, 2):
        return _zero12(trace, zero, world, dtype_bytes)
    raise ValueError(f"ZeRO stage {zero.stage}: only stages 1-3 send collectives")


def _zero3(trace: ModelTrace, zero: ZeroSettings, world: int, dtype_bytes: int):
    numel = trace.numel
    fetched_volume = sum(numel[p] for own in trace.forward_modules for p in own)
    if zero.max_reuse_distance < 2 * fetched_volume or zero.max_live_parameters < sum(
            numel.values()):
        raise ValueError("modelled only when nothing is released before backward: "
                         f"stage3_max_reuse_distance >= {2 * fetched_volume:,} and "
                         f"stage3_max_live_parameters >= {sum(numel.values()):,}")

    def gather(params, phase):
        elements = sum(math.ceil(numel[p] / world) for p in params)
        return Collective("all_gather_into_tensor", phase, elements, dtype_bytes)

    persistent = [p for p in numel if numel[p] <= zero.persistence_threshold]
    resident = set(persistent)  # gathered or in flight
    order = {name: i for i, name in enumerate(numel)}
    queue = deque((p, step) for step, own in enumerate(trace.forward_modules)
                  for p in sorted(set(own), key=order.get))
    last_claimed = defaultdict(lambda: -1)  # the step a queued use of a parameter was taken for
    live = 0
    calls = []
    for step, own in enumerate(trace.forward_modules):
        missing = [p for p in dict.fromkeys(own) if p not in resident]
        if missing:
            calls.append(gather(missing, "forward"))
            resident.update(missing)
            live += sum(numel[p] for p in missing)
        # this module's own queue entries, unless an earlier prefetch already claimed them
        unclaimed = {p for p in own if last_claimed[p] < step}
        popped = set()
        while queue and len(popped) < len(unclaimed):
            p, used_at = queue.popleft()
            last_claimed[p] = used_at
            popped.add(p)
        bucket, bucket_numel = [], 0
        limit = min(zero.max_live_parameters - live, zero.prefetch_bucket_size)
        while queue and bucket_numel < limit:
            p, used_at = queue.popleft()
            last_claimed[p] = max(last_claimed[p], used_at)
            if p not in resident and p not in bucket:
                bucket.append(p)
                bucket_numel += numel[p]
        if bucket:
            calls.append(gather(bucket, "forward"))
            resident.update(bucket)
            live += bucket_numel

    padded = {p: math.ceil(numel[p] / world) * world for p in numel}
    for bucket in _gradient_buckets(trace.grad_order, trace.numel, zero.reduce_bucket_size):
        calls.append(Collective("reduce_scatter_tensor", "backward",
                                sum(padded[p] for p in bucket), dtype_bytes))
    calls.append(Collective("all_reduce", "step", 1, NORM_BYTES[3]))
    calls += [gather([p], "step") for p in persistent]
    return calls


def _zero12(trace: ModelTrace, zero: ZeroSettings, world: int, dtype_bytes: int):
    buckets = _gradient_buckets(trace.plain_grad_order, trace.numel, zero.reduce_bucket_size)
    calls = [Collective("all_reduce", "backward", sum(trace.numel[p] for p in bucket), dtype_bytes)
             for bucket in buckets]
    if dtype_bytes == 2:  # bf16/fp16: the overflow flag (one byte), then the norm per group
        calls.append(Collective("all_reduce", "step", 1, 1))
    calls += [Collective("all_reduce", "step", 1, NORM_BYTES[2]) for _ in trace.groups]
    align = 2 * world  # stage_1_and_2 pads each flat group to nccl_start_alignment_factor x world
    for group in trace.groups:
        flat = sum(trace.numel[p] for p in group)
        calls.append(Collective("all_gather_into_tensor", "step",
                                math.ceil(flat / align) * align // world, dtype_bytes))
    return calls


def _gradient_buckets(order: list[str], numel: dict[str, int],
                      bucket_size: int) -> list[list[str]]:
    """Gradients in ready order, cut before the one that would overfill a bucket."""
    buckets, current, filled = [], [], 0
    for p in order:
        if current and filled + numel[p] > bucket_size:
            buckets.append(current)
            current, filled = [], 0
        current.append(p)
        filled += numel[p]
    return buckets + [current] if current else buckets


def summarize(calls: list[Collective]) -> dict[str, dict]:
    """{op: {"calls", "bytes", "sizes": {bytes: count}}}: the shape the measurement has."""
    ops: dict[str, dict] = {}
    for call in calls:
        entry = ops.setdefault(call.op, {"calls": 0, "bytes": 0, "sizes": {}})
        entry["calls"] += 1
        entry["bytes"] += call.bytes
        entry["sizes"][call.bytes] = entry["sizes"].get(call.bytes, 0) + 1
    return ops
