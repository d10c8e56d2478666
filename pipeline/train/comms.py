"""Per-step collective counts from DeepSpeed's comms logger, in comms/rank{R}.jsonl.

DeepSpeed times every `deepspeed.comm` collective when the DeepSpeed config enables its logger,
`"comms_logger": {"enabled": true}`, but only accumulates totals since start-up (engine set-up,
checkpoints and all). This records what each training step added, one JSON line per step:

    {"step": 3, "ops": {"all_gather_into_tensor": {"1572864": 2, "768": 121}, "all_reduce": ...}}

calls per op and message size in bytes as the logger measures it (`all_gather_into_tensor`: this
rank's input, i.e. the gathered size / world; `reduce_scatter_tensor`: the full input; the
others: the tensor). Only counts and sizes: the logger's latencies are running totals per op
name, not per call, and it synchronises after every op, so a logged run is not a timed one.
`vlp bench comms` reads these files.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


def comms_logging_enabled(ds_config: dict) -> bool:
    return bool(ds_config.get("comms_logger", {}).get("enabled"))


class CommsRecorder:
    """Writes the collectives of each step (what DeepSpeed's comms logger added during it)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.path = Path(run_dir) / "comms" / f"rank{rank}.jsonl" if enabled else None
        self._before: dict = {}

    @contextmanager
    def step(self, step: int):
        if self.path is None:
            yield
            return
        self._before = _snapshot()
        yield
        ops = _difference(_snapshot(), self._before)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "ops": ops}) + "\n")


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
