"""Per-step collective counts from DeepSpeed's comms logger, in comms/rank{R}.jsonl.

DeepSpeed times every `deepspeed.comm` collective when the DeepSpeed config enables its logger,
`"comms_logger": {"enabled": true}`, but only accumulates totals since start-up (engine set-up,
checkpoints and all). This records what each training step added, one JSON line per step:

    {"step": 3, "ops": {"all_gather_into_tensor": {"1572864": 2, "768": 121}, "all_reduce": ...}}

calls per op and message size in bytes as the logger measures it (`all_gather_into_tensor`: this
rank's input, i.e. the gathered size / world; `reduce_scatter_tensor`: the full input; the
others: the tensor). Only counts and sizes: the logger's latencies are running totals per op
name, not per call, and it synchronises after every op, so a logged run is not a timed one.

The ITC loss gathers its embeddings through torch.distributed.nn, not deepspeed.comm, so the
logger never sees them; each line also carries them, with their time (the device synchronised
around each call):

    "itc_gather": {"forward": {"calls": 2, "bytes": 131072, "seconds": 0.0004},
                   "backward": {"calls": 2, "bytes": 131072, "seconds": 0.0006}}

forward: the all-gathers, backward: their gradients' reduce-scatters (gloo: all-to-all); bytes
of the whole gathered tensor (world x batch x embed_dim x dtype bytes). `vlp bench comms` reads
these files.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def comms_logging_enabled(ds_config: dict) -> bool:
    return bool(ds_config.get("comms_logger", {}).get("enabled"))


class CommsRecorder:
    """Writes the collectives of each step (what DeepSpeed's comms logger added during it, and
    the ITC gathers)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        from vlp.models.losses import set_gather

        self.path = Path(run_dir) / "comms" / f"rank{rank}.jsonl" if enabled else None
        self._before: dict = {}
        self.itc = ItcGatherTimer()
        set_gather(self.itc if enabled else None)

    @contextmanager
    def step(self, step: int):
        if self.path is None:
            yield
            return
        self._before = _snapshot()
        self.itc.reset()
        yield
        ops = _difference(_snapshot(), self._before)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "ops": ops, "itc_gather": self.itc.totals}) + "\n")


class ItcGatherTimer:
    """torch.distributed.nn's all_gather, timed: the forward call, and its backward through
    hooks on the gather's autograd node (before and after the node runs)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.totals = {phase: {"calls": 0, "bytes": 0, "seconds": 0.0}
                       for phase in ("forward", "backward")}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torch.distributed.nn.functional import all_gather

        start = _now(x.device)
        parts = all_gather(x)
        nbytes = sum(part.numel() for part in parts) * x.element_size()
        self._add("forward", nbytes, _now(x.device) - start)
        node = parts[0].grad_fn
        if node is not None:
            started = []
            node.register_prehook(lambda grads: started.append(_now(x.device)))
            node.register_hook(lambda inputs, grads: self._add(
                "backward", nbytes, _now(x.device) - started.pop()))
        return parts

    def _add(self, phase: str, nbytes: int, seconds: float) -> None:
        entry = self.totals[phase]
        entry["calls"] += 1
        entry["bytes"] += nbytes
        entry["seconds"] += seconds


def _now(device: torch.device) -> float:
    """The host clock once `device` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _snapshot() -> dict[str, dict[int, int]]:
    """{op: {bytes: calls}}: the logger's running totals."""
    from deepspeed.comm.comm import comms_logger

    return {op: {size: record[0] for size, record in sizes.items()}
            for op, sizes in comms_logger.comms_dict.items()}


def _difference(after: dict, before: dict) -> dict[str, dict[str, int]]:
    ops: dict[str, dict[str, int]] = {}
    for op, sizes in after.items():
        for size, count in sizes.items():
            added = count - before.get(op, {}).get(size, 0)
            if added:
                ops.setdefault(op, {})[str(size)] = added
    return ops
