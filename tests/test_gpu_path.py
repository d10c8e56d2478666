"""What a first GPU call needs, checked without a GPU: the launcher line for GPUs named by UUID,
the wheels gpu_check.sh installs from, its time budget and its results written as they come."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from train_helpers import REPO

from vlp.pipeline.distributed import fast_bf16, free_port, remove_shm_buffers
from vlp.pipeline.train.launch import gpu_selection

# One rank: what CUDA_VISIBLE_DEVICES it ends up with, after the step every rank runs first.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    from vlp.pipeline.distributed import adopt_handed_over_devices
    adopt_handed_over_devices()
    out = os.path.join(sys.argv[-1], "rank" + os.environ["LOCAL_RANK"])
    open(out, "w").write(os.environ["CUDA_VISIBLE_DEVICES"])
""")


def launch_ranks(tmp_path, selection_env, flags, visible: str) -> subprocess.CompletedProcess:
    """The real deepspeed runner, as `vlp train` starts it on a node whose user set
    CUDA_VISIBLE_DEVICES=`visible`, with RANK_SCRIPT as the rank program."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    cmd = [*selection_env, sys.executable, "-m", "deepspeed.launcher.runner",
           "--master_port", str(port), *flags, str(script), str(tmp_path)]
    try:
        return subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
                              capture_output=True, text=True, timeout=120)
    finally:
        remove_shm_buffers(port)


@pytest.mark.slow
@pytest.mark.parametrize("visible", ["GPU-5f3c9d2e-aaaa-4b1c-9e0f-000000000001,"
                                     "GPU-5f3c9d2e-aaaa-4b1c-9e0f-000000000002",
                                     "MIG-7a1b2c3d-bbbb-4c5d-8e9f-000000000003"])
def test_gpus_named_by_uuid_reach_every_rank_through_the_launcher(tmp_path, visible):
    ranks = len(visible.split(","))
    selection = gpu_selection(ranks, ranks, visible)
    done = launch_ranks(tmp_path, selection.env, selection.flags, visible)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(ranks)] == [visible] * ranks


@pytest.mark.slow
def test_the_launcher_alone_cannot_take_uuids(tmp_path):
    """The instrument: given the variable as it is, DeepSpeed's runner parses each id as an
    integer slot and fails."""
    done = launch_ranks(tmp_path, [], [], "GPU-5f3c9d2e-aaaa-4b1c-9e0f-000000000001")
    assert done.returncode != 0 and "invalid literal for int()" in done.stderr


def test_a_subset_of_gpu_ordinals_is_an_include_deepspeed_parses():
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    selection = gpu_selection(2, 3, "4,6,7")
    assert selection.env == []
    assert selection.flags == ["--include", "localhost:4,6"]
    pool = parse_inclusion_exclusion({"localhost": 8}, selection.flags[1], "")
    assert dict(pool) == {"localhost": [4, 6]}
    assert gpu_selection(3, 3, "4,6,7") == ([], [])  # the runner takes the variable itself
    assert gpu_selection(1, 2, None) == ([], ["--num_accelerators", "1"])


def test_a_subset_of_gpu_uuids_is_handed_over():
    selection = gpu_selection(1, 2, "GPU-a,GPU-b")
    assert selection.env == ["env", "-u", "CUDA_VISIBLE_DEVICES", "VLP_CUDA_VISIBLE_DEVICES=GPU-a"]
    assert selection.flags == ["--num_accelerators", "1"]


@pytest.mark.parametrize("gpu, capability, native", [
    ("V100", (7, 0), False), ("T4", (7, 5), False), ("A100", (8, 0), True),
    ("RTX 3090", (8, 6), True), ("H100", (9, 0), True)])
def test_bf16_is_fast_only_from_ampere_on(monkeypatch, gpu, capability, native):
    """torch.cuda.is_bf16_supported() says yes on a V100 too, which emulates bf16; the GPUs
    here are the ones this machine lacks, so torch's answers about them are set."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fast_bf16("cuda") is native, gpu


# ---- the wheels gpu_check.sh installs from ----------------------------------------------------

def requirement_closure(roots: list[str], stop: set[str]) -> set[str]:
    """Every distribution `roots` need at run time (markers evaluated here, no extras),
    following requirements transitively but not into `stop`."""
    seen, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_gpu_wheels_holds_everything_deepspeed_and_webdataset_need_but_torch():
    """An image that has torch and nothing else must install DeepSpeed and webdataset from
    .whl/ alone (no index on a device machine)."""
    script = (REPO / "launch_scripts/gpu_wheels.sh").read_text()
    listed = re.search(r"^PACKAGES=\(([^)]*)\)", script, re.M).group(1).split()
    needed = requirement_closure(["deepspeed", "webdataset"], stop={"torch"})
    shipped = {canonicalize_name(n) for n in listed} | {"deepspeed"}
    assert needed - shipped == set()
    assert "--no-deps" not in script.split("pip wheel", 1)[0]  # nothing downloaded before
    assert "DS_BUILD_OPS=0" in script


# ---- gpu_check.sh: one call of at most 10 minutes -------------------------------------------

def test_gpu_check_steps_fit_one_call_most_valuable_first():
    steps = re.findall(r"^step (\w+) (\d+) ", (REPO / "launch_scripts/gpu_check.sh").read_text(),
                       re.M)
    names = [name for name, _ in steps]
    assert names[:3] == ["smoke_zero2", "smoke", "train"]
    assert names.index("hooks") < names.index("attention")
    assert sum(int(limit) for _, limit in steps) <= 480  # 10 minutes less installs and start-up


def test_a_benchmark_cut_short_keeps_the_figures_it_measured(tmp_path):
    """What gpu_check.sh relies on when a step reaches its time limit: every figure measured
    before the kill is already a line in $VLP_FIGURES, though the run's own JSON never came."""
    figures = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "vlp.pipeline.cli", "bench", "train", "--quick",
           "--repeats", "100000", "--out", str(tmp_path / "train.json")]
    proc = subprocess.Popen(cmd, env={**os.environ, "VLP_FIGURES": str(figures)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (figures.exists() and figures.read_text().count("\n") >= 3):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    records = [json.loads(line) for line in figures.read_text().splitlines()]
    first_round = [r for r in records if r["round"] == 0]
    assert {r["variant"] for r in first_round} == {"hf_clip_itc", "ours_itc", "ours_full"}
    assert all(r["bench"] == "train" and r["step_s"] > 0 and r["mfu"] > 0 for r in first_round)
    assert not (tmp_path / "train.json").exists()
