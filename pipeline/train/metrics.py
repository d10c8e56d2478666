"""Training metrics: the meter that owns the logging window, the TensorBoard/JSONL writer, and MFU.

MFU (one definition, used by training and by `vlp bench train`):

    MFU = model FLOPs per sample x samples/s / (peak FLOP/s per device x devices)

Model FLOPs come from `vlp.models.flops.flops_per_sample` (matmuls only, forward + backward =
3 x forward). The peak is `logging.peak_tflops` when given, else the GPU's dense datasheet
figure for half-precision training (peak_flops.py: 989 for an H100 SXM in bf16, 312 for an A100),
else measured at start-up by `measure_peak_flops`: the median of a dense square matmul in the
training dtype, 8192^3 timed with CUDA events on a GPU, 2048^3 with the wall clock on a CPU rank
(using that rank's threads). Ranks on one machine measure at the same time, each on its own
cores, and the peaks are summed over ranks. The run's log says which peak it uses.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

PEAK_MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}


def measure_peak_flops(dtype: torch.dtype, device: str | torch.device = "cpu", size: int | None = None,
                       repeats: int = 5) -> float:
    """Median FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`."""
    device = torch.device(device)
    size = size or PEAK_MATMUL_SIZE.get(device.type, 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        times.append(_time_once(lambda: a @ b, device))
    return 2 * size**3 / statistics.median(times)


def _time_once(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device`: CUDA events on a GPU (launch overhead and host
    time excluded), the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(device):
            start.record()
            fn()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation; `peak_flops_total` is the peak of all devices of the job."""
    return flops_per_sample * samples_per_s / peak_flops_total


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


class MetricsMeter:
    """Owns the logging window: what happened since the last logged step.

    `update` runs every step and only touches device tensors and host timers (no host sync).
    On a logging step `collect` reduces the step's scalars across ranks in one all-reduce, reads
    them once, and returns the record: every loss and diagnostic (mean over ranks), throughput,
    MFU, the data-wait share and the skipped updates.
    """

    def __init__(self, every_steps: int, max_steps: int, samples_per_step: int,
                 flops_per_sample: float, peak_flops_total: float, device: torch.device):
        self.every_steps, self.max_steps = every_steps, max_steps
        self.samples_per_step = samples_per_step
        self.flops_per_sample, self.peak_flops_total = flops_per_sample, peak_flops_total
        zero = torch.zeros((), device=device)
        self.skipped = zero.clone()  # updates skipped over the run, resumes included
        self.in_row = zero.clone()  # current run of consecutive skipped updates
        self.worst_in_row = zero.clone()  # longest such run since the last logging step
        self.last: dict[str, torch.Tensor] = {}
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0

    def restore(self, skipped_updates: int) -> None:
        self.skipped.fill_(skipped_updates)

    def update(self, scalars: dict[str, torch.Tensor], nonfinite: torch.Tensor,
               data_wait_s: float) -> None:
        """Record one step: its scalars (device tensors) and whether its update was skipped."""
        self.last = scalars
        self.skipped += nonfinite
        self.in_row.mul_(nonfinite).add_(nonfinite)  # +1 when skipped, back to 0 otherwise
        torch.maximum(self.worst_in_row, self.in_row, out=self.worst_in_row)
        self.window_wait += data_wait_s
        self.window_steps += 1

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or step == self.max_steps

    def collect(self, extra: dict[str, float]) -> dict[str, float]:
        """The logging record for the window that ends now (call on every rank together)."""
        elapsed = time.perf_counter() - self.window_start
        names = sorted(self.last)
        values = torch.stack([self.last[k].detach().float().reshape(()) for k in names])
        dist.all_reduce(values)  # on the training device: NCCL serves only CUDA tensors
        values = (values / dist.get_world_size()).tolist()
        samples_per_s = self.samples_per_step * self.window_steps / elapsed
        record = {_tag(name): value for name, value in zip(names, values)}
        record.update({
            "perf/samples_per_s": samples_per_s,
            "perf/mfu": mfu(self.flops_per_sample, samples_per_s, self.peak_flops_total),
            "perf/data_wait_share": self.window_wait / elapsed,
            "train/skipped_updates": int(self.skipped.item()),
            **extra,
        })
        self._reset_window()
        return record

    def worst_nonfinite_run(self) -> int:
        """Longest run of consecutive skipped updates since the last call (reads the device)."""
        worst = int(self.worst_in_row.item())
        self.worst_in_row.copy_(self.in_row)
        return worst


def _tag(output_name: str) -> str:
    """TensorBoard tag of a model output: loss/total, loss/itc, ..., train/itc_acc."""
    if output_name == "loss":
        return "loss/total"
    if output_name.endswith("_loss"):
        return f"loss/{output_name[:-len('_loss')]}"
    return f"train/{output_name}"
