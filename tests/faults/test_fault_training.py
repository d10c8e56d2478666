"""Faults while pretraining through the real deepspeed launcher with 2 CPU ranks: damaged shards,
one rank SIGKILLed mid-step, a kill while a checkpoint is being saved, a truncated checkpoint and
non-finite losses. Every resumed run is compared with the uninterrupted reference run (same
config, same damaged shards): losses, learning rates, skip counts and the sample keys of each
rank at each step must be identical."""
from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch
from fault_helpers import (
    BAD_KEYS,
    EXPECTED_SKIPS,
    TRAVERSAL_KEY,
    RunLogs,
    fault_overrides,
    metric_differences,
    rank_process,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import REPO, kill_group, run_training, start_training

from vlp.pipeline.data.checkpoints import complete_tags, validate_tag

pytestmark = pytest.mark.slow

RESUMED = (4, 5, 6)  # the steps after the step-3 checkpoint
# The launcher polls its ranks once a second and SIGTERMs the survivors (SIGKILL after 30 s);
# dist_timeout_s is 600 in these runs, so a run that ends within this bound was not ended by the
# collective timeout.
RANK_DEATH_BOUND_S = 45


def skip_counts(record: dict) -> dict[str, int]:
    return {k[len("data/skipped_"):]: v for k, v in record.items() if k.startswith("data/skipped_")}


def assert_same_as_reference(reference, metrics, keys, steps=RESUMED):
    assert sorted(metrics) == list(steps), f"steps logged by this launch: {sorted(metrics)}"
    assert metric_differences(metrics, reference.metrics, steps) == []
    for rank in (0, 1):
        assert {s: keys[rank][s] for s in steps} == {s: reference.keys[rank][s] for s in steps}


# --------------------------------------------------------------------- 4. damaged shards

def test_damaged_shards_are_skipped_counted_and_the_run_finishes(reference_run, fault_data):
    ref = reference_run
    assert sorted(ref.metrics) == [1, 2, 3, 4, 5, 6]  # every step ran
    assert all(math.isfinite(record["loss/total"]) for record in ref.metrics.values())
    counts = [skip_counts(ref.metrics[step]) for step in range(1, 7)]
    assert set(counts[0]) == set(EXPECTED_SKIPS)  # every kind is logged, also when 0
    for before, after in zip(counts, counts[1:]):  # cumulative for the run
        assert all(after[kind] >= before[kind] for kind in before)
    # In 6 steps each rank consumes 24 samples: all of its epoch-0 share (at most 17 usable
    # samples), so each damaged item was met at least once. A rank's share holds at least 6
    # usable samples, so no rank starts more than 6 passes; each pass meets each item once.
    # A sample or shard retried in a loop would be counted far more often (and never finish).
    final = counts[-1]
    print(f"reference run: {ref.seconds:.1f} s; skipped by step 6: {final}")
    for kind, once in EXPECTED_SKIPS.items():
        assert once <= final[kind] <= 6 * once, (kind, final[kind])
    summary = json.loads((ref.run_dir / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["skipped_samples"] == final

    events = EventAccumulator(str(ref.run_dir / "tensorboard"))
    events.Reload()
    for kind in EXPECTED_SKIPS:
        curve = [(e.step, e.value) for e in events.Scalars(f"data/skipped_{kind}")]
        assert curve == [(step, counts[step - 1][kind]) for step in range(1, 7)], kind

    used = {key for rank in ref.keys for keys in rank.values() for key in keys}
    assert not BAD_KEYS & used
    assert {"trunc_0", "trunc_1"} <= used  # a truncated tar's samples before the damage are used
    assert not {"trunc_2", "trunc_3", "trunc_4"} & used  # the one being read when it broke is not
    assert not fault_data.pickle_marker.exists(), "a .pyd/.pth member was unpickled"


def test_index_reports_the_damaged_shards(fault_data):
    manifest = json.loads((fault_data.root / "manifest.json").read_text())
    problems = {(p["shard"], p["kind"]) for p in manifest["problems"]}
    assert {("00005.tar", "corrupt_tar"), ("00006.tar", "corrupt_tar")} <= problems
    issues = manifest["sample_issues"]
    assert issues["non_utf8_caption"] == 1 and issues["empty_caption"] == 1
    assert issues["no_image"] == 1  # the pickle-only sample


def test_member_names_with_dot_dot_write_nothing(reference_run, fault_data):
    """A sample named ../../evil is data like any other: the loader reads members into memory,
    so the name never becomes a path (it only appears in the sample-key log)."""
    run_dir = reference_run.run_dir
    for base in (REPO, run_dir, run_dir / "samples", run_dir / "checkpoints", fault_data.root):
        for ext in ("jpg", "txt"):
            assert not (base / f"{TRAVERSAL_KEY}.{ext}").resolve().exists()
    assert not list(fault_data.root.parent.rglob("evil.*"))
    assert not list(run_dir.rglob("evil.*"))


# ---------------------------------------- 1 + 2. a rank killed mid-step, a kill during saving

@pytest.fixture(scope="module")
def interrupted(fault_data, tokenizer_dir, tmp_path_factory):
    """One run dir, three launches:
    1. SIGKILL rank 1 (only that process) as soon as it starts step 5;
    2. --resume latest, with the fault hook that SIGKILLs rank 0 while it saves step 6
       (DeepSpeed's files written, the tag not yet published);
    3. --resume latest again, to the end.
    Returns what each launch did and what the checkpoint directory looked like after it."""
    root = tmp_path_factory.mktemp("interrupted")
    run_dir = root / "run"
    ckpt = run_dir / "checkpoints"
    overrides = fault_overrides(run_dir, fault_data.pattern, tokenizer_dir)
    logs = RunLogs(run_dir)
    seen = {}

    proc = start_training(overrides, root / "launch1.txt")
    key_log = run_dir / "samples/rank1.jsonl"
    try:
        rank1, deadline = None, time.monotonic() + 300
        while not (key_log.exists() and '"step": 5,' in key_log.read_text()):
            assert proc.poll() is None, (root / "launch1.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached step 5"
            rank1 = rank1 or rank_process(proc.pid, 1)
            time.sleep(0.02)
        rank1 = rank1 or rank_process(proc.pid, 1)
        rank1.kill()  # SIGKILL to one rank; the launcher and rank 0 are left alone
        killed = time.monotonic()
        rc = proc.wait(timeout=300)
        seen["launch1"] = {"rc": rc, "seconds_to_exit": time.monotonic() - killed,
                           "latest": (ckpt / "latest").read_text(), "pid": rank1.pid}
    finally:
        kill_group(proc)
    logs.new()

    crash = overrides + ["faults.crash_during_save_at_step=6"]
    rc = run_training(crash, root / "launch2.txt", resume="latest")
    metrics, keys = logs.new()
    partial = ckpt / "global_step6.partial"
    seen["launch2"] = {
        "rc": rc, "log": (root / "launch2.txt").read_text(), "metrics": metrics, "keys": keys,
        "latest": (ckpt / "latest").read_text(),
        "entries": sorted(p.name for p in ckpt.iterdir()),
        "partial_files": sorted(p.name for p in partial.iterdir()) if partial.exists() else None,
        "complete": [p.name for p in complete_tags(ckpt)],
        "step3_problems": validate_tag(ckpt / "global_step3"),
    }
    from vlp.pipeline.data.model_loading import load_model

    seen["launch2"]["eval_load"] = load_model(ckpt).info  # what `latest` loads now

    rc = run_training(overrides, root / "launch3.txt", resume="latest")
    metrics, keys = logs.new()
    seen["launch3"] = {
        "rc": rc, "log": (root / "launch3.txt").read_text(), "metrics": metrics, "keys": keys,
        "latest": (ckpt / "latest").read_text(),
        "entries": sorted(p.name for p in ckpt.iterdir()),
    }
    return seen


def test_a_killed_rank_ends_the_launcher_quickly(interrupted):
    launch = interrupted["launch1"]
    print(f"launcher exited {launch['rc']} {launch['seconds_to_exit']:.1f} s after SIGKILL of "
          f"rank 1 (pid {launch['pid']})")
    assert launch["rc"] != 0
    assert launch["seconds_to_exit"] < RANK_DEATH_BOUND_S
    assert launch["latest"] == "global_step3"  # killed before the step-6 checkpoint


def test_resume_after_a_killed_rank_is_sample_exact(interrupted, reference_run):
    launch = interrupted["launch2"]
    assert "resumed from" in launch["log"] and "global_step3 at step 3" in launch["log"]
    assert_same_as_reference(reference_run, launch["metrics"], launch["keys"])


def test_a_kill_during_saving_leaves_the_previous_checkpoint_published(interrupted):
    launch = interrupted["launch2"]
    print(f"kill during saving: launcher exited {launch['rc']}; left {launch['entries']}")
    assert launch["rc"] != 0
    assert "fault injection: SIGKILL rank 0 while saving" in launch["log"]
    assert launch["latest"] == "global_step3"
    assert launch["complete"] == ["global_step3"] and launch["step3_problems"] == []
    assert "global_step6" not in launch["entries"]
    files = launch["partial_files"]  # DeepSpeed's files and our metadata, but no state file
    assert files is not None and "vlp_state.json" not in files
    assert any(f.endswith("model_states.pt") for f in files)
    assert sum(f.endswith("optim_states.pt") for f in files) == 2  # both ranks had written
    info = launch["eval_load"]
    assert (info.tag, info.step) == ("global_step3", 3)


def test_resume_after_a_kill_during_saving_uses_the_previous_tag(interrupted, reference_run):
    launch = interrupted["launch3"]
    assert launch["rc"] == 0, launch["log"][-3000:]
    assert "global_step3 at step 3" in launch["log"]
    assert_same_as_reference(reference_run, launch["metrics"], launch["keys"])
    assert launch["latest"] == "global_step6"
    assert not [name for name in launch["entries"] if name.endswith(".partial")]


# --------------------------------------------------------- 3. a truncated latest checkpoint

def test_truncated_latest_is_refused_and_latest_valid_trains_on(reference_run, fault_data,
                                                                tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.run_dir, run_dir)
    (run_dir / "metrics.jsonl").unlink()  # so every record read below is this test's
    shutil.rmtree(run_dir / "samples")
    shard = sorted((run_dir / "checkpoints/global_step6").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # and one bit of another file, same size: only its sha256 shows it (the ranks share the
    # hashing; every rank gets every problem)
    flipped = sorted((run_dir / "checkpoints/global_step6").glob("*model_states.pt"))[0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    overrides = fault_overrides(run_dir, fault_data.pattern, tokenizer_dir)

    start = time.monotonic()
    rc = run_training(overrides, tmp_path / "refused.txt", resume="latest")
    refused_after = time.monotonic() - start
    log = (tmp_path / "refused.txt").read_text()
    print(f"refused with exit {rc} after {refused_after:.1f} s")
    assert rc == 2
    assert f"error: the latest checkpoint {run_dir / 'checkpoints/global_step6'} is corrupt" in log
    assert f"{shard} has {shard.stat().st_size} bytes" in log and "latest-valid" in log
    assert f"{flipped} has the recorded size but not the recorded sha256 (corrupted)" in log
    assert not (run_dir / "metrics.jsonl").exists()  # refused before any step

    logs = RunLogs(run_dir)
    rc = run_training(overrides, tmp_path / "fallback.txt", resume="latest-valid")
    log = (tmp_path / "fallback.txt").read_text()
    assert rc == 0, log[-3000:]
    assert "global_step3 at step 3" in log
    assert_same_as_reference(reference_run, *logs.new())
    assert validate_tag(run_dir / "checkpoints/global_step6") == []  # rewritten whole


# ------------------------------------------------------------------ 5. non-finite losses

def test_nonfinite_losses_skip_the_update_then_stop_the_run(reference_run, fault_data,
                                                            tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = fault_overrides(run_dir, fault_data.pattern, tokenizer_dir,
                                "faults.inject_nonfinite_at=[2, 4, 5]",
                                "faults.max_nonfinite_in_row=2")
    start = time.monotonic()
    rc = run_training(overrides, tmp_path / "log.txt")
    print(f"non-finite run: exit {rc} after {time.monotonic() - start:.1f} s")
    log = (tmp_path / "log.txt").read_text()
    assert rc == 3, log[-3000:]
    assert "step 2: 1 update(s) in a row skipped for a non-finite loss (1 in the run)" in log
    assert "error: 2 consecutive steps had a non-finite loss (seen at step 5); stopping" in log

    metrics, keys = RunLogs(run_dir).new()
    ref = reference_run.metrics
    assert sorted(metrics) == [1, 2, 3, 4, 5]  # step 5 was logged, then the run stopped
    assert metric_differences(metrics, ref, [1]) == []
    assert [metrics[s]["train/skipped_updates"] for s in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 3]
    assert all(math.isnan(metrics[s]["loss/total"]) for s in (2, 4, 5))
    assert math.isfinite(metrics[3]["loss/total"])  # training went on after the skipped step
    # No update at step 2: step 3 starts from step 1's weights. A skipped step still counts as a
    # step, so the schedule stays a function of the step number.
    assert [metrics[s]["train/lr"] for s in (2, 3)] == [ref[2]["train/lr"], ref[3]["train/lr"]]
    assert metrics[3]["loss/total"] != ref[3]["loss/total"]
    for rank in (0, 1):  # the data moves on: a skipped batch is not fed again
        assert keys[rank] == {s: reference_run.keys[rank][s] for s in range(1, 6)}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()  # what was logged before the stop reached TensorBoard too
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_updates")] == [
        (1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]
    assert (run_dir / "checkpoints/latest").read_text() == "global_step3"


def test_a_nonfinite_micro_step_skips_the_whole_accumulated_update(shard_dir, tokenizer_dir,
                                                                    tmp_path):
    """grad_accum=2, NaN in the first micro-step of step 2 on rank 0: both ranks skip step 2's
    update (weights unchanged), the next updates land on DeepSpeed's accumulation boundary as
    before (a run resumed from step 2 reproduces them exactly), and no batch is fed twice."""
    from train_helpers import train_overrides

    from vlp.pipeline.data.model_loading import load_model

    def overrides(run_dir):
        return train_overrides(run_dir, shard_dir, tokenizer_dir, "optim.grad_accum=2",
                               "optim.max_steps=4", "checkpoint.every_steps=1",
                               "checkpoint.keep_last=0", "faults.inject_nonfinite_at=[2]")

    run_dir = tmp_path / "nan"
    logs = RunLogs(run_dir)
    rc = run_training(overrides(run_dir), tmp_path / "nan.txt")
    assert rc == 0, (tmp_path / "nan.txt").read_text()[-3000:]
    metrics, keys = logs.new()
    assert [metrics[s]["train/skipped_updates"] for s in range(1, 5)] == [0, 1, 1, 1]
    assert [math.isnan(metrics[s]["loss/total"]) for s in range(1, 5)] == [False, True, False,
                                                                            False]
    for rank in (0, 1):  # 4 steps x 2 micro-batches x 8 fit in each rank's share of the epoch
        assert all(len(keys[rank][s]) == 2 * 8 for s in range(1, 5))
        seen = [k for s in range(1, 5) for k in keys[rank][s]]
        assert len(seen) == len(set(seen))

    weights = {step: load_model(run_dir / f"checkpoints/global_step{step}").model.state_dict()
               for step in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # skipped, whole
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    for step in (1, 2):
        shutil.copytree(run_dir / f"checkpoints/global_step{step}",
                        resumed_dir / f"checkpoints/global_step{step}")
    (resumed_dir / "checkpoints/latest").write_text("global_step2")
    resumed_logs = RunLogs(resumed_dir)
    rc = run_training(overrides(resumed_dir), tmp_path / "resumed.txt")
    assert rc == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    resumed_metrics, resumed_keys = resumed_logs.new()
    assert sorted(resumed_metrics) == [3, 4]
    assert metric_differences(resumed_metrics, metrics, [3, 4]) == []
    for rank in (0, 1):
        assert {s: resumed_keys[rank][s] for s in (3, 4)} == {s: keys[rank][s] for s in (3, 4)}
