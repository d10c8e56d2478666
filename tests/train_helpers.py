"""Shared pieces for tests that run real training jobs through the deepspeed launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from vlp.pipeline.distributed import free_port
from vlp.pipeline.data.checkpoints import describe_files, tag_files
from vlp.pipeline.data.manifest import shard_url_pattern
from vlp.pipeline.distributed import remove_shm_buffers
from vlp.pipeline.train.launch import launcher_command

REPO = Path(__file__).resolve().parents[1]
# A model small enough that a launcher run is dominated by start-up, not steps.
SMALL_MODEL = "model.overrides={depth: 2, width: 64, heads: 2, fusion_layers: 1, embed_dim: 32}"
# The DeepSpeed files of a fake 2-rank tag (make_tag).
SHARDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def single_rank_env(**extra: str) -> dict[str, str]:
    """Environment for one rank of a 1-process torch.distributed job started without a launcher."""
    return {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **extra}


def train_overrides(run_dir: Path, shard_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return pattern_overrides(run_dir, shard_url_pattern(shard_dir), tokenizer_dir, *extra)


def pattern_overrides(run_dir: Path, shards: str, tokenizer_dir: Path, *extra: str) -> list[str]:
    """A short small-model run on the shards `shards` names; later `extra` entries win."""
    return [
        f"run_dir={run_dir}", f"ds_config={REPO / 'ds_configs/zero3_cpu.json'}",
        f"data.shards={shards}", f"data.tokenizer={tokenizer_dir}",
        "data.num_workers=1", "data.shuffle_buffer=50", SMALL_MODEL,
        "optim.batch_size=8", "optim.warmup_steps=2", "optim.max_steps=6",
        "checkpoint.every_steps=3", "logging.every_steps=1", "logging.peak_tflops=1",
        "logging.sample_keys=true", "dist_timeout_s=60", *extra,
    ]


def start_training(overrides: list[str], log_path: Path, **launch) -> subprocess.Popen:
    """Start the real deepspeed launcher in its own process group (so a test can kill it all);
    `kill_group` ends it and removes what its ranks left in /dev/shm."""
    launch.setdefault("master_port", free_port())
    cmd = launcher_command(None, overrides, **launch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.master_port = launch["master_port"]
    return proc


def run_training(overrides: list[str], log_path: Path, timeout: float = 300, **launch) -> int:
    proc = start_training(overrides, log_path, **launch)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group, then remove the DeepSpeed shared-memory buffers
    its ranks could not (69 MB per rank, in /dev/shm until reboot)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    remove_shm_buffers(proc.master_port)


def shm_buffers(port: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged again after a resume replaces the old one."""
    records = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return records


def keys_by_step(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """{step: keys of all its micro-batches}; a step logged again after a resume replaces the
    old one."""
    records: dict[int, list[str]] = {}
    for line in (Path(run_dir) / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["micro"] == 0:
            records[record["step"]] = []
        records[record["step"]] += record["keys"]
    return records


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def make_tag(ckpt_dir: Path, step: int, published: float | None = None) -> Path:
    """A published tag as save_checkpoint leaves it, without training: torch-saved stand-ins for
    DeepSpeed's files plus vlp_state.json (sizes, sha256s, publication time, by default the
    step); `latest` names it."""
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    for i, name in enumerate(SHARDS):
        torch.save({"step": step, "weights": torch.full((25 * (i + 1),), float(step))}, tag / name)
    refresh_state(tag, {"step": step, "tag": tag.name, "world_size": 2,
                        "time": step if published is None else published})
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def refresh_state(tag: Path, state: dict | None = None) -> None:
    """(Re)write a tag's vlp_state.json to describe its files as they are now."""
    state = state or json.loads((tag / "vlp_state.json").read_text())
    state["files"] = describe_files(tag, tag_files(tag))
    (tag / "vlp_state.json").write_text(json.dumps(state))
