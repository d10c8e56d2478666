"""Session fixtures of the fault suite: shards with every kind of damage beside good ones, and one
uninterrupted reference run on them that the kill/resume tests compare against."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_helpers import RunLogs, fault_overrides, write_fault_shards
from train_helpers import run_training


@dataclass
class FaultData:
    pattern: str  # brace pattern of all 7 shards
    root: Path
    pickle_marker: Path  # created if anything ever unpickles a shard member


@dataclass
class ReferenceRun:
    run_dir: Path
    rc: int
    seconds: float
    log: str
    metrics: dict[int, dict]
    keys: list[dict[int, list[str]]]  # per rank: {step: sample keys}


@pytest.fixture(scope="session")
def fault_data(shard_dir, tmp_path_factory) -> FaultData:
    root = tmp_path_factory.mktemp("fault_data")
    marker = root / "UNPICKLED"
    pattern = write_fault_shards(Path(shard_dir), root / "shards", marker)
    return FaultData(pattern, root / "shards", marker)


@pytest.fixture(scope="session")
def reference_run(fault_data, tokenizer_dir, tmp_path_factory) -> ReferenceRun:
    """6 uninterrupted steps through the deepspeed launcher on the damaged shards."""
    run_dir = tmp_path_factory.mktemp("fault_reference") / "run"
    logs = RunLogs(run_dir)
    start = time.monotonic()
    rc = run_training(fault_overrides(run_dir, fault_data.pattern, tokenizer_dir),
                      run_dir.parent / "log.txt")
    seconds = time.monotonic() - start
    log = (run_dir.parent / "log.txt").read_text()
    assert rc == 0, log[-4000:]
    metrics, keys = logs.new()
    return ReferenceRun(run_dir, rc, seconds, log, metrics, keys)
