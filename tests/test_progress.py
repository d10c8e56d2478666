"""Progress lines of long evaluation steps: whole lines at most one per interval in a log, one line
redrawn in place on a terminal, nothing on ranks > 0."""
import io
import os
import pty
import tty

import pytest

from vlp.pipeline.progress import ProgressLine, format_rate, progress_text, tracked


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(progress: ProgressLine, clock: FakeClock, steps: int, seconds: float, n: int):
    for _ in range(steps):
        clock.now += seconds
        progress.update(n)


def test_a_log_gets_the_first_line_then_one_per_interval_and_the_last():
    clock, log = FakeClock(), io.StringIO()  # a file, not a terminal
    with ProgressLine("encode images", 100, "image", every_s=30, stream=log,
                      clock=clock) as progress:
        run_steps(progress, clock, 10, 7.0, 10)  # a batch of 10 every 7 s
    lines = log.getvalue().splitlines(keepends=True)
    assert [line.split(" | ")[0] for line in lines] == [
        "encode images: 10/100 (10%)",  # the first batch (t=7)
        "encode images: 60/100 (60%)",  # the first at least 30 s later (t=42)
        "encode images: 100/100 (100%)",  # the last (t=70), whatever the interval
    ]
    assert lines[0] == "encode images: 10/100 (10%) | 1.4 images/s | elapsed 7s | ETA 1m03s\n"
    assert lines[-1].endswith("| elapsed 1m10s | ETA 0s\n")
    assert "\r" not in log.getvalue()


def test_a_step_that_stops_early_shows_where_it_stopped():
    clock, log = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with ProgressLine("vqa fine-tune", 400, "step", stream=log, clock=clock) as progress:
            run_steps(progress, clock, 3, 2.0, 1)
            progress.update(1, "loss 2.3411")
            raise RuntimeError("out of memory")
    assert log.getvalue().splitlines() == [
        "vqa fine-tune: 1/400 (0%) | 2.0s/step | elapsed 2s | ETA 13m18s",
        "vqa fine-tune: 4/400 (1%) | loss 2.3411 | 1.5s/step | elapsed 6s | ETA 9m54s",
    ]


def terminal_output(write) -> str:
    """What `write(terminal)` shows on a real terminal (a pseudo-terminal in raw mode: no
    newline translation)."""
    reader, writer = pty.openpty()
    tty.setraw(writer)
    with open(writer, "w") as terminal:
        write(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(reader, 4096)
        except OSError:  # the terminal is closed and all it showed was read
            break
        if not chunk:
            break
        shown += chunk
    os.close(reader)
    return shown.decode()


def test_a_terminal_gets_one_line_redrawn_in_place():
    clock = FakeClock()

    def write(terminal):
        with ProgressLine("ITM scoring", 1000, "pair", stream=terminal, clock=clock) as progress:
            run_steps(progress, clock, 10, 0.125, 10)  # redrawn at most every 0.2 s
            progress.update(900)  # the last, at once

    shown = terminal_output(write)
    assert shown.endswith("\n") and shown.count("\n") == 1
    draws = shown.rstrip("\n").split("\r")[1:]
    assert [draw.split(" | ")[0].strip() for draw in draws] == [
        "ITM scoring: 10/1000 (1%)", "ITM scoring: 30/1000 (3%)", "ITM scoring: 50/1000 (5%)",
        "ITM scoring: 70/1000 (7%)", "ITM scoring: 90/1000 (9%)", "ITM scoring: 1000/1000 (100%)"]
    assert draws[-1] == "ITM scoring: 1000/1000 (100%) | 800.0 pairs/s | elapsed 1s | ETA 0s"


def test_a_shorter_redraw_blanks_what_the_longer_line_left():
    clock = FakeClock()

    def write(terminal):
        progress = ProgressLine("fit", 2, "fit", stream=terminal, clock=clock)
        clock.now = 1.0
        progress.update(1, "a long note that the next line does not have")
        clock.now = 2.0
        progress.update(1)

    first, second = terminal_output(write).split("\r")[1:]
    assert len(second) == len(first)
    assert second.rstrip() == "fit: 2/2 (100%) | 1.0 fits/s | elapsed 2s | ETA 0s"


def test_other_ranks_print_nothing(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = io.StringIO()
    with ProgressLine("encode texts", 10, "text", stream=log) as progress:
        progress.update(10)
    assert log.getvalue() == ""


@pytest.mark.parametrize("done, elapsed, text", [(853, 10, "85.3 images/s"),
                                                 (10, 42, "4.2s/image"),
                                                 (3, 1200, "6m40s/image")])
def test_rates_read_per_second_or_per_item(done, elapsed, text):
    assert format_rate(done, elapsed, "image") == text


def test_before_anything_is_done_there_is_no_rate_or_eta():
    assert progress_text("caption decoding", 0, 5, "image", 0.0) == (
        "caption decoding: 0/5 (0%) | elapsed 0s")


def test_tracked_yields_every_item_and_ends_on_the_final_count(capsys):
    """tracked() stands where a tqdm bar was (rendering, caption sampling, resharding)."""
    assert list(tracked(["a", "b", "c"], "render train", "image")) == ["a", "b", "c"]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("render train: 1/3 (33%) | ")
    assert lines[-1].startswith("render train: 3/3 (100%) | ") and lines[-1].endswith("ETA 0s")
