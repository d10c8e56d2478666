"""Progress of a long job step on stderr, readable on a terminal and in a log file alike:

    vqa fine-tune: 120/400 (30%) | loss 2.3411 | 2.3 steps/s | elapsed 52s | ETA 2m01s

On a terminal the line is redrawn in place (`\\r`). In a log file (`sbatch`, cron, `2> eval.log`)
each line is whole: the first update, then at most one every LOG_EVERY_S seconds, and the last,
so a hung job stops printing while a working one does not. Only rank 0 prints; stdout stays free
for results. Training's status line (pipeline/train/status.py) shares the formatting.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterator, Sequence, TextIO, TypeVar

import torch.distributed as dist

T = TypeVar("T")
LOG_EVERY_S = 30.0  # a log file gets at most one line per this many seconds (plus the last)
TTY_EVERY_S = 0.2  # a terminal's line is redrawn at most this often (plus the last)


def format_duration(seconds: float) -> str:
    """1h02m, 9m12s, 45s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def done_of(done: int, total: int) -> str:
    """40/540 (7%)."""
    percent = 100 * done // total if total else 100
    return f"{done}/{total} ({percent}%)"


def remaining_seconds(done: int, left: int, elapsed: float) -> float | None:
    """Time for `left` more at the average pace of the `done` so far; None before any is done."""
    return left * elapsed / done if done > 0 else None


def format_rate(done: int, elapsed: float, unit: str) -> str:
    """85.3 images/s; 4.2s/step or 6m40s/checkpoint when each takes longer than a second."""
    if done >= elapsed:
        return f"{done / elapsed:.1f} {unit}s/s"
    each = elapsed / done
    return f"{each:.1f}s/{unit}" if each < 60 else f"{format_duration(each)}/{unit}"


def progress_text(label: str, done: int, total: int, unit: str, elapsed: float,
                  note: str = "") -> str:
    """`label: done/total (percent) | note | rate | elapsed | ETA`, the rate and ETA once known."""
    parts = [f"{label}: {done_of(done, total)}"] + ([note] if note else [])
    if done > 0 and elapsed > 0:
        parts.append(format_rate(done, elapsed, unit))
    parts.append(f"elapsed {format_duration(elapsed)}")
    eta = remaining_seconds(done, max(0, total - done), elapsed)
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


def is_main_rank() -> bool:
    """Rank 0 of torch.distributed when it is initialised, else of the launcher's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class ProgressLine:
    """done/total of one job step with its rate and ETA, on stderr (rank 0 only).

    Call `update(n)` after each batch (host-side counts only: no device sync) and `close()` at
    the end, or use it as a context manager. `clock` is injectable for tests."""

    def __init__(self, label: str, total: int, unit: str = "item", *,
                 every_s: float = LOG_EVERY_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.enabled = is_main_rank()
        self.tty = self.stream.isatty()
        self.every_s = TTY_EVERY_S if self.tty else every_s
        self.clock = clock
        self.started = self.shown_at = clock()
        self.done, self.note = 0, ""
        self.shown: int | None = None  # `done` when a line was last shown; None before the first
        self.width = 0  # of the terminal line drawn last, to blank what a shorter one leaves

    def update(self, n: int = 1, note: str = "") -> None:
        """`n` more done; `note` (e.g. the latest loss) goes into the line."""
        self.done += n
        self.note = note
        if not self.enabled:
            return
        now = self.clock()
        if self.shown is None or now - self.shown_at >= self.every_s or self.done >= self.total:
            self._show(now)

    def _show(self, now: float) -> None:
        text = progress_text(self.label, self.done, self.total, self.unit, now - self.started,
                             self.note)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown, self.shown_at = self.done, now

    def close(self) -> None:
        """Show the final count if the last line did not; end the terminal's line."""
        if not self.enabled or self.shown is None:
            return
        if self.shown != self.done:
            self._show(self.clock())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(items: Sequence[T], label: str, unit: str = "item") -> Iterator[T]:
    """Iterate `items` with a ProgressLine (where a tqdm bar would go), each item counted as it
    is handed out: a consumer that stops at the last one still shows the full count."""
    with ProgressLine(label, len(items), unit) as line:
        for item in items:
            line.update()
            yield item
