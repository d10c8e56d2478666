"""What a training job prints: plain status lines when its output goes to a file, and one copy of
each warning.

Under `sbatch` or `nohup` stdout is a file and a tqdm bar would print nothing useful, so rank 0
prints one line every `logging.status_every_steps` steps instead (as torchtitan and OpenCLIP do):

    step 40/540 (7%) | loss 5.1234 | lr 1.20e-04 | 118.3 samples/s | MFU 1.23% | data wait 3%
        | ETA 9m12s            (one line)

The line reuses the record of a logging step (no extra device reads), so it appears on the first
logging step at or after each multiple of the interval. A terminal keeps the tqdm bar.

Every rank runs the same code, so DeepSpeed and torch warn the same thing once per rank, some of
them on every call. `keep_one_copy_of_warnings` lets rank 0 show each message once and the other
ranks only errors.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings

from vlp.pipeline.progress import done_of, format_duration, remaining_seconds

DEEPSPEED_LOGGER = "DeepSpeed"


def status_line(step: int, max_steps: int, record: dict[str, float], eta_s: float | None) -> str:
    """One plain-text progress line from a logging record (metrics.MetricsMeter.collect)."""
    parts = [f"step {done_of(step, max_steps)}",
             f"loss {record['loss/total']:.4f}",
             f"lr {record['train/lr']:.2e}",
             f"{record['perf/samples_per_s']:.1f} samples/s",
             f"MFU {100 * record['perf/mfu']:.2f}%",
             f"data wait {100 * record['perf/data_wait_share']:.0f}%"]
    if record.get("train/skipped_updates"):
        parts.append(f"skipped updates {record['train/skipped_updates']}")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class Progress:
    """Rank 0's progress display: the tqdm bar on a terminal (stderr), status lines when stdout
    is not a terminal. Both can be on (`vlp train > log` from a terminal); neither on other
    ranks."""

    def __init__(self, enabled: bool, start: int, max_steps: int, status_every: int,
                 bar: bool, stream=None):
        self.stream = stream or sys.stdout
        self.start, self.max_steps, self.status_every = start, max_steps, status_every
        self.started_at = time.perf_counter()
        self.next_status = (start // status_every + 1) * status_every if status_every else None
        self.lines = enabled and bool(status_every) and not self.stream.isatty()
        self.bar = None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start, desc="train", unit="step")

    def step_done(self, step: int, record: dict[str, float] | None) -> None:
        """After each step; `record` is the logging record when this step logged, else None."""
        if self.bar is not None:
            self.bar.update(1)
        if not self.lines or record is None:
            return
        if step >= self.next_status or step == self.max_steps:
            print(status_line(step, self.max_steps, record, self._eta(step)), file=self.stream,
                  flush=True)
            self.next_status = (step // self.status_every + 1) * self.status_every

    def _eta(self, step: int) -> float | None:
        """Remaining time at this run's average pace so far (checkpoint saves included)."""
        return remaining_seconds(step - self.start, self.max_steps - step,
                                 time.perf_counter() - self.started_at)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class OneCopyFilter(logging.Filter):
    """Rank 0 passes each message once; other ranks pass errors only."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if self.rank != 0:
            return False
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def keep_one_copy_of_warnings(rank: int) -> None:
    """Install the one-copy rule for DeepSpeed's logger and Python warnings (torch's included).

    Call before DeepSpeed is imported: its logger keeps filters added beforehand. Python warnings
    go through `warnings.showwarning`, so the rule holds even when a library resets the warning
    filters (which makes Python's own once-per-location rule repeat a message)."""
    logging.getLogger(DEEPSPEED_LOGGER).addFilter(OneCopyFilter(rank))
    shown: set[tuple[str, str]] = set()
    show = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        key = (category.__name__, str(message))
        if rank != 0 or key in shown:
            return
        shown.add(key)
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once
