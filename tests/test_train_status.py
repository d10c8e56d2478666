"""Plain-log status lines and the one-copy rule for warnings (training output under nohup)."""
import io
import logging
import warnings

import pytest

from vlp.pipeline.train import status
from vlp.pipeline.train.status import OneCopyFilter, Progress, format_duration, status_line

RECORD = {"loss/total": 5.123456, "train/lr": 1.2e-4, "perf/samples_per_s": 118.34,
          "perf/mfu": 0.01234, "perf/data_wait_share": 0.031, "train/skipped_updates": 0}


def test_status_line_shows_every_field_of_the_record():
    assert status_line(40, 540, RECORD, 552) == (
        "step 40/540 (7%) | loss 5.1235 | lr 1.20e-04 | 118.3 samples/s | MFU 1.23% "
        "| data wait 3% | ETA 9m12s")
    skipped = {**RECORD, "train/skipped_updates": 2}
    assert status_line(540, 540, skipped, None).endswith("data wait 3% | skipped updates 2")


@pytest.mark.parametrize("seconds, text", [(45.4, "45s"), (552, "9m12s"), (3720, "1h02m"),
                                           (-3, "0s")])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_prints_on_the_first_logging_step_at_each_interval(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(status.time, "perf_counter", clock)
    out = io.StringIO()  # not a terminal, like a log file
    progress = Progress(True, start=0, max_steps=25, status_every=10, bar=True, stream=out)
    for step in range(1, 26):
        clock.now += 2.0  # 2 s per step
        logged = step % 3 == 0 or step == 25  # logging.every_steps=3
        progress.step_done(step, RECORD if logged else None)
    steps = [line.split("|")[0].strip() for line in out.getvalue().splitlines()]
    assert steps == ["step 12/25 (48%)", "step 21/25 (84%)", "step 25/25 (100%)"]
    first = out.getvalue().splitlines()[0]
    assert first.endswith("ETA 26s")  # 13 steps left at 2 s each


def test_progress_after_a_resume_counts_the_pace_from_the_resumed_step(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(status.time, "perf_counter", clock)
    out = io.StringIO()
    progress = Progress(True, start=100, max_steps=200, status_every=50, bar=False, stream=out)
    clock.now += 50.0
    progress.step_done(150, RECORD)
    assert out.getvalue() == status_line(150, 200, RECORD, 50.0) + "\n"


def test_no_status_lines_on_other_ranks_or_when_switched_off():
    for enabled, every in ((False, 10), (True, 0)):
        out = io.StringIO()
        progress = Progress(enabled, start=0, max_steps=10, status_every=every, bar=False,
                            stream=out)
        progress.step_done(10, RECORD)
        assert out.getvalue() == ""


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("DeepSpeed", level, __file__, 1, message, None, None)


def test_rank0_passes_each_deepspeed_message_once_other_ranks_only_errors():
    rank0, rank1 = OneCopyFilter(0), OneCopyFilter(1)
    messages = [record(logging.WARNING, "accelerator is CPU"), record(logging.INFO, "step 1"),
                record(logging.WARNING, "accelerator is CPU"), record(logging.ERROR, "oom"),
                record(logging.ERROR, "oom")]
    assert [rank0.filter(r) for r in messages] == [True, True, False, True, True]
    assert [rank1.filter(r) for r in messages] == [False, False, False, True, True]


@pytest.mark.parametrize("rank, expected", [(0, 1), (1, 0)])
def test_python_warnings_show_once_per_message_even_when_filters_reset(monkeypatch, rank,
                                                                       expected):
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *args, **kw: shown.append(args[0]))
    monkeypatch.setattr(logging.getLogger(status.DEEPSPEED_LOGGER), "filters", [])
    status.keep_one_copy_of_warnings(rank)
    for _ in range(3):
        with warnings.catch_warnings():  # resets Python's once-per-location registry
            warnings.simplefilter("always")
            warnings.warn("all_gather_into_tensor is deprecated", FutureWarning)
    assert len(shown) == expected
