"""The training step and the metrics meter against a stub engine with known losses, on one and
on two gloo ranks (this process rank 0, a forked child rank 1: a fork runs this process's code)."""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import types

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode

from vlp.pipeline.distributed import free_port
from vlp.pipeline.train import metrics, step as step_module
from vlp.pipeline.train.config import FaultSection
from vlp.pipeline.train.faults import FaultInjector
from vlp.pipeline.train.metrics import MetricsLogger, MetricsMeter, measure_peak_flops, mfu
from vlp.pipeline.train.step import TrainStep


class Clock:
    """A stub for the `time` module: perf_counter() reads `now`, which the test advances."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Moved:
    """A batch value that records how the step moves it to the device."""

    def __init__(self, name):
        self.name, self.moves = name, []

    def to(self, device, non_blocking=False):
        self.moves.append((str(device), non_blocking))
        return self.name


class StubEngine:
    """The engine calls TrainStep makes; forward returns the next of `losses` with a diagnostic
    (the micro-step's number), a non-scalar output and a non-tensor one."""

    device = torch.device("cpu")

    def __init__(self, losses, optimizer, clock=None):
        self.losses, self.optimizer, self.clock = iter(losses), optimizer, clock
        self.calls, self.micro = [], 0

    def __call__(self, **inputs):
        if self.clock is not None:
            self.clock.now += 100.0  # compute time is not data wait
        self.calls.append(("forward", sorted(inputs)))
        self.micro += 1
        return {"loss": torch.tensor(next(self.losses)), "itc_acc": torch.tensor(float(self.micro)),
                "sim": torch.zeros(2, 2), "note": 1.0}

    def backward(self, loss):
        self.calls.append(("backward", loss.item()))

    def step(self):
        found = getattr(self.optimizer, "found_inf", None)
        self.calls.append(("step", None if found is None else found.item()))


def _batches(clock=None, wait=0.0):
    while True:
        if clock is not None:
            clock.now += wait
        yield {"images": Moved("images"), "text_ids": Moved("text_ids"), "keys": ["k"]}


def test_a_step_runs_each_micro_batch_and_averages_its_scalars(one_rank, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(step_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    optimizer = types.SimpleNamespace()
    engine = StubEngine([1.0, 2.0, 6.0], optimizer, clock)
    seen = []
    train_step = TrainStep(engine, optimizer, 3, FaultInjector(FaultSection(), 0),
                           on_batch=lambda step, micro, batch: seen.append((step, micro, batch)))
    batch = next(_batches())
    result = train_step(iter(lambda: batch, None), step=7)
    assert {k: v.item() for k, v in result.scalars.items()} == {"loss": 3.0, "itc_acc": 2.0}
    assert result.nonfinite.item() == 0.0 and optimizer.found_inf.item() == 0.0
    assert seen == [(7, 0, batch), (7, 1, batch), (7, 2, batch)]
    inputs = ("forward", ["images", "text_ids"])  # only the model's inputs
    assert engine.calls == [inputs, ("backward", 1.0), ("step", None),
                            inputs, ("backward", 2.0), ("step", None),
                            inputs, ("backward", 6.0), ("step", 0.0)]
    assert batch["images"].moves == [("cpu", True)] * 3  # asynchronous copies
    clock.now = 0.0
    result = TrainStep(StubEngine([1.0, 1.0], optimizer, clock), optimizer, 2,
                       FaultInjector(FaultSection(), 0))(_batches(clock, wait=2.5), step=1)
    assert result.data_wait_s == 5.0  # the time spent in next(batches), not in the forward


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_nonfinite_micro_step_skips_the_whole_update(one_rank, bad):
    optimizer = types.SimpleNamespace()
    engine = StubEngine([1.0, bad, 2.0], optimizer)
    result = TrainStep(engine, optimizer, 3, FaultInjector(FaultSection(), 0))(_batches(), 1)
    assert result.nonfinite.item() == 1.0
    assert [c for c in engine.calls if c[0] == "step"] == [("step", None)] * 2 + [("step", 1.0)]
    result = TrainStep(StubEngine([1.0, 2.0], optimizer), optimizer, 2,
                       FaultInjector(FaultSection(), 0))(_batches(), 2)
    assert result.nonfinite.item() == 0.0 and optimizer.found_inf.item() == 0.0


def test_an_injected_fault_reports_the_nan_loss_it_trains_on(one_rank):
    optimizer = types.SimpleNamespace()
    engine = StubEngine([1.0, 2.0, 3.0, 4.0], optimizer)
    train_step = TrainStep(engine, optimizer, 2,
                           FaultInjector(FaultSection(inject_nonfinite_at=[2]), 0))
    first, second = train_step(_batches(), 1), train_step(_batches(), 2)
    assert first.scalars["loss"].item() == 1.5 and first.nonfinite.item() == 0.0
    assert math.isnan(second.scalars["loss"].item()) and second.nonfinite.item() == 1.0
    assert second.scalars["itc_acc"].item() == 3.5  # the diagnostics stay as they were
    assert math.isnan(engine.calls[-5][1])  # the NaN loss is what backward got


def _on_two_ranks(fn, *args):
    """fn(rank, *args) on rank 0 here and rank 1 in a forked child, in a 2-rank gloo group ->
    both results (a child's result must be JSON)."""
    port = free_port()
    reader, writer = multiprocessing.Pipe(duplex=False)

    def child():
        torch.set_num_threads(1)  # the parent's OpenMP threads are not in the fork
        writer.send(json.dumps(_in_group(1, port, fn, *args)))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    ours = _in_group(0, port, fn, *args)
    theirs = json.loads(reader.recv()) if reader.poll(30) else None
    process.join(30)
    return [ours, theirs]


def _in_group(rank, port, fn, *args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=15))
    try:
        return fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _skips(rank, losses_per_rank):
    """Steps of grad_accum 2 with rank `rank`'s losses -> (found_inf, nonfinite) per step."""
    optimizer = types.SimpleNamespace()
    losses = losses_per_rank[rank]
    train_step = TrainStep(StubEngine(losses, optimizer), optimizer, 2,
                           FaultInjector(FaultSection(), rank))
    out = []
    for n in range(len(losses) // 2):
        result = train_step(_batches(), n + 1)
        out.append([optimizer.found_inf.item(), result.nonfinite.item()])
    return out


def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank():
    nan = math.nan
    losses = [[1.0, 1.0, nan, 1.0, 1.0, 1.0],  # step 2: both ranks; step 3: neither
              [nan, 1.0, 1.0, nan, 1.0, 1.0]]  # step 1: rank 1 only
    assert _on_two_ranks(_skips, losses) == [[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]] * 2


def _collect(rank, clock):
    meter = MetricsMeter(every_steps=10, max_steps=25, samples_per_step=8, flops_per_sample=5.0,
                         peak_flops_total=100.0, device=torch.device("cpu"))
    for nonfinite, wait in ((1.0, 1.0), (0.0, 3.0)):
        meter.update({"loss": torch.tensor(2.0 + 4 * rank), "itc_acc": torch.tensor(0.5 * rank)},
                     torch.tensor(nonfinite), wait)
    clock.now = 8.0
    record = meter.collect({"lr": 0.1})
    meter.update({"loss": torch.tensor(1.0 + 4 * rank)}, torch.tensor(0.0), 0.0)
    clock.now = 12.0
    return [record, meter.collect({})]


def test_a_logging_record_averages_over_ranks_and_covers_its_window(monkeypatch):
    """Two steps of 8 samples in 8 s on each rank, 4 s of which waiting for data; rank 0's loss
    2, rank 1's 6. The next window: one step in 4 s."""
    clock = Clock()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    expected = {"loss/total": 4.0, "train/itc_acc": 0.25, "perf/samples_per_s": 2.0,
                "perf/mfu": 0.1, "perf/data_wait_share": 0.5, "train/skipped_updates": 1,
                "lr": 0.1}
    later = {"perf/samples_per_s": 2.0, "perf/data_wait_share": 0.0, "perf/mfu": 0.1,
             "train/skipped_updates": 1}
    for first, second in _on_two_ranks(_collect, clock):
        assert first == expected
        assert type(first["train/skipped_updates"]) is int
        assert {k: v for k, v in second.items() if k != "loss/total"} == later
        assert second["loss/total"] == pytest.approx(3.0)  # rank 1's loss was 5 in that window


def test_the_meter_counts_skipped_updates_and_the_longest_run_of_them():
    meter = MetricsMeter(every_steps=5, max_steps=12, samples_per_step=1, flops_per_sample=1.0,
                         peak_flops_total=1.0, device=torch.device("cpu"))
    meter.restore(4)  # skipped before a resume
    for nonfinite in (1, 1, 0, 1, 1, 1, 0, 1):
        meter.update({}, torch.tensor(float(nonfinite)), 0.0)
    assert meter.skipped.item() == 10
    assert meter.worst_nonfinite_run() == 3
    assert meter.worst_nonfinite_run() == 1  # the run still going
    meter.update({}, torch.tensor(1.0), 0.0)
    assert meter.worst_nonfinite_run() == 2
    assert [meter.due(s) for s in (4, 5, 10, 11, 12)] == [False, True, True, False, True]


def test_mfu_and_output_tags():
    assert mfu(flops_per_sample=3e9, samples_per_s=50.0, peak_flops_total=1e12) == 0.15
    assert [metrics._tag(n) for n in ("loss", "itc_loss", "itc_acc", "loss_scale")] == [
        "loss/total", "loss/itc", "train/itc_acc", "train/loss_scale"]


def test_the_peak_is_the_median_of_timed_matmuls(monkeypatch):
    times = iter([4.0, 1.0, 8.0, 2.0, 3.0])
    calls = []

    def timed(fn, device):
        product = fn()  # the timed work: a (size x size) matmul in the dtype asked for
        calls.append((device.type, tuple(product.shape), product.dtype))
        return next(times)

    monkeypatch.setattr(metrics, "_time_once", timed)
    assert measure_peak_flops(torch.bfloat16, size=3) == 2 * 27 / 3.0  # on the CPU by default
    assert calls == [("cpu", (3, 3), torch.bfloat16)] * 5
    monkeypatch.setattr(metrics, "_time_once", lambda fn, device: 2.0)
    monkeypatch.setitem(metrics.PEAK_MATMUL_SIZE, "cpu", 4)  # the device's default size
    assert measure_peak_flops(torch.float32, "cpu") == 2 * 64 / 2.0


def test_the_peak_matmul_runs_on_the_device_asked_for_at_its_default_size(monkeypatch):
    """On the meta device (no data, no compute): both operands live there, and a device type
    without an entry in PEAK_MATMUL_SIZE gets 2048."""
    calls = []

    class OperandDevices(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.matmul:  # what `a @ b` dispatches as
                calls.append(tuple(operand.device.type for operand in args))
            return func(*args, **(kwargs or {}))

    def timed(fn, device):
        with OperandDevices():  # meta @ cpu runs without complaint: look at each operand
            product = fn()
        calls.append((device.type, tuple(product.shape)))
        return 1.0

    monkeypatch.setattr(metrics, "_time_once", timed)
    assert measure_peak_flops(torch.float32, "meta") == 2 * 2048**3
    assert calls == [("meta", "meta"), ("meta", (2048, 2048))] * 5


class StubCudaEvent:
    """torch.cuda.Event's timing surface: each record() is a tick of a clock in milliseconds."""

    log: list[str] = []
    ticks = iter([])

    def __init__(self, enable_timing=False):
        assert enable_timing is True  # an event made without timing cannot report elapsed_time
        self.at = None

    def record(self):
        self.at = next(self.ticks)
        self.log.append("record")

    def synchronize(self):
        self.log.append("synchronize")

    def elapsed_time(self, end: StubCudaEvent) -> float:
        return end.at - self.at


def test_a_matmul_on_a_gpu_is_timed_by_cuda_events_in_seconds(monkeypatch):
    """The GPU path, run here on stub events: the work runs between the two records, on the
    device asked for, and the events' milliseconds come back as seconds."""
    devices = []

    class StubDevice:
        def __init__(self, device):
            devices.append(device)

        def __enter__(self):
            StubCudaEvent.log.append("enter")

        def __exit__(self, *exc):
            StubCudaEvent.log.append("exit")

    monkeypatch.setattr(StubCudaEvent, "log", [])
    monkeypatch.setattr(StubCudaEvent, "ticks", iter([1000.0, 1250.0]))
    monkeypatch.setattr(torch.cuda, "Event", StubCudaEvent)
    monkeypatch.setattr(torch.cuda, "device", StubDevice)
    gpu = torch.device("cuda", 1)
    seconds = metrics._time_once(lambda: StubCudaEvent.log.append("work"), gpu)
    assert seconds == 0.25
    assert StubCudaEvent.log == ["enter", "record", "work", "record", "synchronize", "exit"]
    assert devices == [gpu]


def test_the_meter_keeps_its_counters_on_the_training_device():
    meter = MetricsMeter(every_steps=5, max_steps=12, samples_per_step=1, flops_per_sample=1.0,
                         peak_flops_total=1.0, device=torch.device("meta"))
    assert {t.device.type for t in (meter.skipped, meter.in_row, meter.worst_in_row)} == {"meta"}


def test_a_matmul_on_the_cpu_is_timed_by_the_wall_clock(monkeypatch):
    clock = Clock()
    clock.now = 10.0
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def work():
        clock.now += 0.25

    assert metrics._time_once(work, torch.device("cpu")) == 0.25


def test_the_logger_appends_one_json_line_per_step_and_writes_nothing_when_off(tmp_path):
    for run in range(2):  # a resumed run appends
        logger = MetricsLogger(tmp_path, enabled=True)
        logger.log(3 + run, {"loss/total": 1.5})
        # each line is on disk as soon as it is logged: a live run can be followed
        last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
        assert json.loads(last) == {"step": 3 + run, "loss/total": 1.5}
        logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "loss/total": 1.5},
                                                    {"step": 4, "loss/total": 1.5}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(3, 1.5), (4, 1.5)]
    off = tmp_path / "off"
    off.mkdir()
    logger = MetricsLogger(off, enabled=False)
    logger.log(1, {"loss/total": 1.0})
    logger.close()
    assert list(off.iterdir()) == []
