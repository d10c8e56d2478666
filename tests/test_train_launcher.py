"""Pretraining through the real deepspeed launcher with 2 CPU ranks on data_prep's shards."""
import json
import math
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import (
    free_port,
    keys_by_step,
    kill_group,
    metrics_by_step,
    pattern_overrides,
    run_training,
    shm_buffers,
    start_training,
    train_overrides,
    wait_for,
)

from vlp.pipeline.data.checkpoints import weights_only_loads
from vlp.pipeline.data.manifest import shard_url_pattern
from vlp.pipeline.train.launch import rendezvous_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shard_dir, tokenizer_dir):
    """An uninterrupted 6-step run, checkpointing every 3 steps. Its process group serves CPU
    tensors only (`cpu:gloo`), as NCCL serves only CUDA ones: a collective on a tensor of another
    device fails instead of being served by gloo's second device type."""
    run_dir = tmp_path_factory.mktemp("reference")
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "dist_backend=cpu:gloo",
                                "logging.status_every_steps=2")
    rc = run_training(overrides, run_dir / "log.txt")
    assert rc == 0, (run_dir / "log.txt").read_text()[-3000:]
    return run_dir


def test_training_logs_every_curve_to_tensorboard(reference_run):
    events = EventAccumulator(str(reference_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/itc", "loss/itm", "loss/mlm", "train/lr", "train/grad_norm",
                "perf/samples_per_s", "perf/mfu", "perf/data_wait_share", "data/shard_reads",
                "data/retries", "checkpoint/save_s"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any(tag.startswith("data/skipped_") for tag in tags)
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < lrs[1] == max(lrs) and lrs[-1] < lrs[1]  # 2 warmup steps, then cosine decay


def test_a_log_file_gets_status_lines_and_one_copy_of_each_warning(reference_run):
    """The launcher's output goes to a file (as under sbatch or nohup): rank 0 prints a status
    line every 2 steps with the logged values, and each rank's repeated warnings appear once."""
    log = (reference_run / "log.txt").read_text().splitlines()
    metrics = metrics_by_step(reference_run)
    lines = [line for line in log if line.startswith("step ") and " | loss " in line]
    assert [line.split(" ")[1] for line in lines] == ["2/6", "4/6", "6/6"]
    for line, step in zip(lines, (2, 4, 6)):
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:3])
        assert fields == {"loss": f"{metrics[step]['loss/total']:.4f}",
                          "lr": f"{metrics[step]['train/lr']:.2e}"}
    assert "ETA" in lines[0] and lines[-1].endswith("ETA 0s")
    warnings = [line for line in log if "Warning: " in line]
    assert warnings and len(warnings) == len(set(warnings)), "\n".join(warnings)
    # DeepSpeed's accelerator notice: once from the runner, the node launcher and rank 0 only
    assert sum("Setting accelerator to CPU" in line for line in log) == 3


def test_checkpoints_are_published_with_metadata(reference_run):
    ckpt = reference_run / "checkpoints"
    assert (ckpt / "latest").read_text() == "global_step6"
    for tag in ("global_step3", "global_step6"):
        state = json.loads((ckpt / tag / "vlp_state.json").read_text())
        assert state["world_size"] == 2 and state["tag"] == tag
        assert (ckpt / tag / "config.json").exists() and (ckpt / tag / "tokenizer.json").exists()
    assert not list(ckpt.glob("*.partial"))


def test_each_rank_keeps_only_its_own_loader_and_rng_state(reference_run):
    """One small file per rank; DeepSpeed's model-states files (one per rank under ZeRO-3) carry
    only what the ranks share."""
    tag = reference_run / "checkpoints/global_step6"
    own = [json.loads((tag / f"vlp_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [sorted(state) for state in own] == [["loader", "rng"]] * 2
    assert own[0]["loader"] != own[1]["loader"]
    model_states = sorted(tag.glob("*model_states.pt"))
    assert len(model_states) == 2
    with weights_only_loads():
        for path in model_states:
            client_state = torch.load(path, weights_only=True)
            assert client_state["step"] == 6 and "ranks" not in client_state


def test_sigkill_then_resume_is_sample_exact(reference_run, tmp_path, shard_dir, tokenizer_dir):
    run_dir = tmp_path / "killed"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir)
    proc = start_training(overrides, tmp_path / "log1.txt")
    try:
        wait_for(lambda: 4 in metrics_by_step(run_dir), 240, "step 4 to be logged", proc)
        assert len(shm_buffers(proc.master_port)) == 2  # one per rank, while they run
    finally:
        kill_group(proc)  # SIGKILL to the launcher and both ranks, after the step-3 checkpoint
    assert shm_buffers(proc.master_port) == []  # the test cleans up what the killed job left
    assert (run_dir / "checkpoints/latest").read_text() == "global_step3"

    rc = run_training(overrides, tmp_path / "log2.txt")  # checkpoint.resume=auto finds `latest`
    assert rc == 0, (tmp_path / "log2.txt").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "log2.txt").read_text()

    expected, resumed = metrics_by_step(reference_run), metrics_by_step(run_dir)
    for step in (4, 5, 6):
        for name in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert resumed[step][name] == expected[step][name], (step, name)
    for rank in (0, 1):
        assert keys_by_step(run_dir, rank) == keys_by_step(reference_run, rank)
    seen = [k for rank in (0, 1) for keys in keys_by_step(run_dir, rank).values() for k in keys]
    assert len(seen) == len(set(seen)) == 6 * 2 * 8  # nothing repeated within the epoch


def test_resume_on_shards_in_s3_is_sample_exact(reference_run, tmp_path, shard_dir,
                                               tokenizer_dir):
    """The reference run's step-3 checkpoint, continued on the same shards served from S3
    (moto's server on 127.0.0.1, credentials in the environment): steps 4-6 train on the same
    batches, with the same losses, as the uninterrupted run on local files."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3_helpers import moto_s3, upload_folder

    run_dir = tmp_path / "s3"
    tag = "checkpoints/global_step3"
    shutil.copytree(reference_run / tag, run_dir / tag)
    (run_dir / "checkpoints/latest").write_text("global_step3")
    with moto_s3():
        upload_folder(shard_dir, "vlp-data/shards")
        pattern = shard_url_pattern(shard_dir).replace(str(shard_dir), "s3://vlp-data/shards")
        rc = run_training(pattern_overrides(run_dir, pattern, tokenizer_dir), tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "unreadable" not in log

    expected, resumed = metrics_by_step(reference_run), metrics_by_step(run_dir)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for name in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert resumed[step][name] == expected[step][name], (step, name)
    for rank in (0, 1):
        reference_keys = {s: k for s, k in keys_by_step(reference_run, rank).items() if s > 3}
        assert keys_by_step(run_dir, rank) == reference_keys


def test_resume_with_another_world_size_is_a_clear_error(reference_run, tmp_path, shard_dir,
                                                         tokenizer_dir):
    overrides = train_overrides(reference_run, shard_dir, tokenizer_dir, "optim.max_steps=9")
    rc = run_training(overrides, tmp_path / "log.txt", nproc=1)
    log = (tmp_path / "log.txt").read_text()
    assert rc != 0
    assert "was written by 2 ranks; this run has 1. Run with 2, or set " \
           "checkpoint.change_world_size=true" in log
    assert "model.init_from=" in log  # the error names both ways that exist


def adam_steps(tag_dir) -> set[float]:
    """Adam's step count in every optimizer shard of a ZeRO-3 tag."""
    from vlp.pipeline.data.checkpoints import weights_only_loads

    steps = set()
    for shard in sorted(tag_dir.glob("*optim_states.pt")):
        with weights_only_loads():
            state = torch.load(shard, weights_only=True)["optimizer_state_dict"][
                "optimizer_state_dict"]["state"]
        steps |= {float(group["step"]) for group in state.values()}
    return steps


def universal_states(tag_dirs, out_root) -> list[dict[str, torch.Tensor]]:
    """Every parameter's fp32 weights and Adam moments in each ZeRO-3 tag, read through
    DeepSpeed's universal checkpoint (one file per parameter and kind), which no world size
    shapes. The tags are converted side by side."""
    outs = [out_root / str(i) for i in range(len(tag_dirs))]
    procs = [subprocess.Popen([sys.executable, "-m", "vlp.pipeline.train.universal", str(tag),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for tag, out in zip(tag_dirs, outs)]
    for proc in procs:
        output = proc.communicate()[0]
        assert proc.returncode == 0, output[-2000:]
    return [{f"{path.parent.name}/{path.stem}": torch.load(path, weights_only=True)
             for path in sorted((out / "zero").glob("*/*.pt"))} for out in outs]


def test_resume_on_another_world_size_carries_weights_optimizer_and_schedule_over(
        reference_run, tmp_path, shard_dir, tokenizer_dir):
    """The 2-rank run's step-3 checkpoint resumed on 1 rank (checkpoint.change_world_size).
    Step 4's update is skipped (an injected NaN), so the 1-rank tag of step 4 must hold exactly
    the 2-rank tag of step 3: the fp32 weights and both Adam moments of every parameter, bit for
    bit. The schedule continues where it was (lr of step 4 = the reference's; the skipped update
    does not advance it) and Adam counts on from 3 (a fresh optimizer would count from 0)."""
    run_dir = tmp_path / "resized"
    source = reference_run / "checkpoints/global_step3"
    shutil.copytree(source, run_dir / "checkpoints/global_step3")
    (run_dir / "checkpoints/latest").write_text("global_step3")
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir,
                                "checkpoint.change_world_size=true", "checkpoint.every_steps=2",
                                "checkpoint.keep_last=0", "faults.inject_nonfinite_at=[4]")
    rc = run_training(overrides, tmp_path / "log.txt", nproc=1)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-3000:]
    assert (f"resumed from {run_dir / 'checkpoints/global_step3'} at step 3 on 1 rank(s); it was "
            "written by 2") in log
    resumed, expected = metrics_by_step(run_dir), metrics_by_step(reference_run)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s]["train/lr"] for s in (4, 5, 6)] == [expected[s]["train/lr"]
                                                           for s in (4, 4, 5)]
    assert [resumed[s]["train/skipped_updates"] for s in (4, 5, 6)] == [1, 1, 1]
    assert all(math.isfinite(resumed[s]["loss/total"]) for s in (5, 6))
    ckpt = run_dir / "checkpoints"
    assert json.loads((ckpt / "global_step4/vlp_state.json").read_text())["world_size"] == 1
    assert adam_steps(source) == adam_steps(ckpt / "global_step4") == {3.0}
    assert adam_steps(ckpt / "global_step6") == {5.0}
    assert not list(ckpt.glob("*universal*"))  # the converted copy was removed

    before, after = universal_states([source, ckpt / "global_step4"], tmp_path / "universal")
    assert sorted(before) == sorted(after) and len(before) > 100
    assert [name for name in before if not torch.equal(before[name], after[name])] == []


def test_two_launchers_as_two_nodes_train_as_one_world(tmp_path, shard_dir, tokenizer_dir):
    """Node 0 and node 1 each start their own launcher (--no_ssh --node_rank) on loopback."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "multinode"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "optim.max_steps=2",
                                "checkpoint.every_steps=2")
    port = free_port()
    nodes = [start_training(overrides, tmp_path / f"node{rank}.txt", hostfile=str(hostfile),
                            master_addr="127.0.0.1", master_port=port, node_rank=rank)
             for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)
    assert codes == [0, 0], [(tmp_path / f"node{r}.txt").read_text()[-2000:] for r in (0, 1)]
    state = json.loads((run_dir / "checkpoints/global_step2/vlp_state.json").read_text())
    assert state["world_size"] == 2
    assert set(keys_by_step(run_dir, 0)) == set(keys_by_step(run_dir, 1)) == {1, 2}


def test_warm_start_takes_the_weights_on_another_world_size(reference_run, tmp_path, shard_dir,
                                                            tokenizer_dir):
    """model.init_from: a new run on 1 rank starts from the 2-rank run's step-6 weights (the way
    to change world size), with a fresh optimizer and data order, and says so."""
    from vlp.pipeline.data.model_loading import load_model

    run_dir = tmp_path / "warm"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "optim.max_steps=1",
                                "optim.warmup_steps=1",
                                f"model.init_from={reference_run / 'checkpoints'}",
                                "checkpoint.save_initial=true")
    rc = run_training(overrides, tmp_path / "log.txt", nproc=1)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-3000:]
    assert f"warm start: weights of {reference_run / 'checkpoints' / 'global_step6'} (step 6)" in log
    source = load_model(reference_run / "checkpoints").model.state_dict()
    started = load_model(run_dir / "checkpoints" / "global_step0").model.state_dict()
    # ZeRO-3 keeps fp32 masters of the engine's weights: equal once both are in the engine dtype
    assert all(torch.equal(started[k].bfloat16(), source[k].bfloat16()) for k in source)
    assert json.loads((run_dir / "train_summary.json").read_text())["step"] == 1

    wrong = train_overrides(tmp_path / "other", shard_dir, tokenizer_dir,
                            f"model.init_from={reference_run / 'checkpoints'}",
                            "model.overrides={depth: 3, width: 64, heads: 2, fusion_layers: 1, "
                            "embed_dim: 32}")
    rc = run_training(wrong, tmp_path / "wrong.txt", nproc=1)
    assert rc == 2
    assert "its model config differs from this run's in depth (2 vs 3)" in \
        (tmp_path / "wrong.txt").read_text()


def test_one_node_without_master_port_rendezvouses_on_a_free_port(monkeypatch, capsys):
    """Every launch used port 29500, so a second job on a node died with EADDRINUSE. Now each
    picks a port no one holds, even under SLURM (one node needs no agreement)."""
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    first = rendezvous_port(None, multi_node=False)
    with socket.socket() as job:  # the first job's rendezvous, listening
        job.bind(("", first))
        job.listen()
        second = rendezvous_port(None, multi_node=False)
    assert second != first and 29500 not in (first, second)
    assert capsys.readouterr().err.splitlines() == [
        f"rendezvous on port {first} (free port picked)",
        f"rendezvous on port {second} (free port picked)"]


def test_several_nodes_derive_one_port_from_the_slurm_job_id(monkeypatch, capsys):
    """Every node's launcher computes the same port without talking to the others; another job
    (another id) gets another port; no scheduler, the old default."""
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    assert [rendezvous_port(None, multi_node=True) for _ in range(3)] == [24567] * 3
    monkeypatch.setenv("SLURM_JOB_ID", "1234568")
    assert rendezvous_port(None, multi_node=True) == 24568
    monkeypatch.delenv("SLURM_JOB_ID")
    assert rendezvous_port(None, multi_node=True) == 29500
    assert capsys.readouterr().err.splitlines() == [
        *["rendezvous on port 24567 (from SLURM_JOB_ID)"] * 3,
        "rendezvous on port 24568 (from SLURM_JOB_ID)",
        "rendezvous on port 29500 (default: no SLURM_JOB_ID)"]


def test_an_explicit_master_port_is_kept(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    assert rendezvous_port(29611, multi_node=False) == 29611
    assert rendezvous_port(29611, multi_node=True) == 29611
    assert capsys.readouterr().err.splitlines() == ["rendezvous on port 29611 (--master-port)"] * 2


def test_a_store_failing_too_many_shard_reads_stops_the_run_with_one_error(
        tmp_path, shard_dir, tokenizer_dir, monkeypatch):
    """The 5 shards in S3 behind a proxy that fails every ranged read of one of them: each read
    of it is retried once (data/retries) and counted unreadable; once 20 shard reads are in, 1 in
    5 failed is more than data.max_unreadable_share=0.05, and every rank stops with exit 4 and
    one error line."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3_helpers import clear_filesystems, failing_proxy, moto_s3, upload_folder

    run_dir = tmp_path / "run"
    with moto_s3() as endpoint:
        upload_folder(shard_dir, "vlp-data/shards")
        with failing_proxy(endpoint, lambda path, byte_range: "00002.tar" in path
                           and byte_range is not None) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off
            clear_filesystems()
            overrides = pattern_overrides(
                run_dir, "s3://vlp-data/shards/{00000..00004}.tar", tokenizer_dir,
                "optim.max_steps=100", "logging.every_steps=2", "checkpoint.every_steps=1000",
                "data.read_retries=1", "logging.sample_keys=false")
            rc = run_training(overrides, tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert rc == 4, log[-3000:]
    errors = [line for line in log.splitlines() if "vlp train: error: " in line]
    assert len(errors) == 1 and "shard reads failed" in errors[0], errors
    metrics = metrics_by_step(run_dir)
    last = metrics[max(metrics)]
    assert last["data/shard_reads"] >= 20 and max(metrics) < 100  # judged, stopped early
    assert last["data/skipped_unreadable_shard"] > 0.05 * last["data/shard_reads"]
    assert last["data/retries"] == last["data/skipped_unreadable_shard"]
    assert not (run_dir / "train_summary.json").exists()
