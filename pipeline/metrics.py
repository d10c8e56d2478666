"""Training metrics: TensorBoard scalars plus a JSONL log on rank 0, and the MFU peak.

MFU = model FLOPs per sample x samples/s / (peak FLOP/s per rank x ranks). The model FLOPs come
from `models.flops.flops_per_sample` (matmuls only, forward + backward = 3 x forward). The peak is
given in the config or measured here with a large matmul in the training dtype.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def measure_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5,
                       device: str = "cpu") -> float:
    """Median FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on this process."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


class MetricsLogger:
    """Writes scalars to TensorBoard and `metrics.jsonl` (one JSON object per logged step)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
