"""`vlp bench zero`: ZeRO-3 training-state bytes per rank on 1 vs 2 ranks, and step time of
ZeRO-3 vs ZeRO-2 vs a single process without DeepSpeed.

Every DeepSpeed run goes through the real launcher, exactly as training does:

    deepspeed --master_port P --num_accelerators N --module vlp.pipeline.bench.zero_worker ...

(CPU accelerator, gloo, bf16; ds_configs/zero3_cpu.json and zero2_cpu.json with the batch set
here). The single process runs the same worker with plain torch (fp32 weights, bf16 autocast,
fused AdamW). Each worker times `--steps` full training steps (ITC+ITM+MLM) after `--warmup`,
counts its rank's parameter, gradient and optimizer-state bytes from the engine (how: see
vlp/pipeline/bench/zero_worker.py) and writes a JSON file per rank, which this command collects.
Ranks on one machine share its cores: the launcher's ranks each get cores / ranks torch threads
(vlp.pipeline.distributed.init_distributed), the single process all of them, so step times compare
whole-machine throughput (samples/s = batch per rank x ranks / step time). `--threads 1` runs
every process on one thread instead (steadier on a shared machine); then compare samples/s per
thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vlp.pipeline.bench.common import (
    QUICK_MODEL,
    environment,
    format_table,
    median,
    out_path,
    repeats_for,
    verdict,
    worker_launch_command,
    write_json,
)
from vlp.pipeline.bench.zero_worker import DS_CONFIGS

WORKER = "vlp.pipeline.bench.zero_worker"
# (mode, ranks): the memory pair first, then the step-time comparison
PLAN = [("zero3", 1), ("zero3", 2), ("zero2", 2), ("single", 1)]
QUICK_PLAN = [("zero3", 1), ("zero3", 2)]
COMPONENTS = ("parameters", "gradients", "optimizer_master", "optimizer_adam", "total")


def add_arguments(p) -> None:
    p.add_argument("--config", default="small", help="model size (default small)")
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=4, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per launch")
    p.add_argument("--runs", default=None,
                   help="comma-separated MODE:RANKS to run (default zero3:1,zero3:2,zero2:2,"
                        "single:1; --quick: zero3:1,zero3:2)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    p.add_argument("--threads", type=int,
                   help="torch threads per process (OMP_NUM_THREADS); default: cores / ranks. "
                        "1 gives steadier times on a shared machine (no OpenMP barrier waits)")


def _launch(mode: str, ranks: int, args, out_dir: Path) -> None:
    worker_args = ["--mode", mode, "--out-dir", str(out_dir), "--config", args.config,
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
    if args.quick:
        worker_args += ["--overrides", json.dumps(QUICK_MODEL)]
    if mode == "single":
        cmd = [sys.executable, "-m", WORKER, *worker_args]
    else:
        cmd = worker_launch_command(WORKER, worker_args, ranks)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{mode} on {ranks} rank(s) failed ({proc.returncode}): "
                           f"{' '.join(cmd)}\n{tail}")


def _collect(out_dir: Path, mode: str, ranks: int) -> list[dict]:
    files = sorted(out_dir.glob(f"{mode}_w{ranks}_rank*.json"))
    if len(files) != ranks:
        raise RuntimeError(f"{mode} on {ranks} rank(s) wrote {len(files)} result files")
    return [json.loads(f.read_text()) for f in files]


def run(args) -> int:
    if args.quick:
        args.batch, args.steps, args.warmup = 2, 1, 1
    plan = ([(m, int(n)) for m, n in (item.split(":") for item in args.runs.split(","))]
            if args.runs else (QUICK_PLAN if args.quick else PLAN))
    repeats = repeats_for(args, full=1)
    per_run: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vlp_bench_zero_") as tmp:
        for r in range(repeats):  # rounds over the plan: launches interleave
            for mode, ranks in plan:
                out_dir = Path(tmp) / f"round{r}"
                _launch(mode, ranks, args, out_dir)
                per_run.setdefault(f"{mode}_w{ranks}", []).extend(_collect(out_dir, mode, ranks))

    results, rows = {}, []
    for key, records in per_run.items():
        mode, world = records[0]["mode"], records[0]["world_size"]
        rank0 = [rec for rec in records if rec["rank"] == 0]
        steps = [t for rec in rank0 for t in rec["step_s"]]
        step_s = median(steps)
        bytes_rank0 = rank0[0]["bytes"]
        results[key] = {
            "mode": mode, "world_size": world, "batch_per_rank": records[0]["batch_per_rank"],
            "torch_threads_per_rank": records[0]["torch_threads"],
            "model_parameters": records[0]["model_parameters"],
            "step_s_median": step_s, "step_s": steps,
            "samples_per_s": records[0]["batch_per_rank"] * world / step_s,
            "samples_per_s_per_thread": (records[0]["batch_per_rank"] * world / step_s
                                         / (world * records[0]["torch_threads"])),
            "bytes_per_rank": bytes_rank0,
            "bytes_all_ranks": {rec["rank"]: rec["bytes"] for rec in records[:world]},
        }
        rows.append([key, world, records[0]["torch_threads"], bytes_rank0["parameters"] / 2**20,
                     bytes_rank0["gradients"] / 2**20,
                     (bytes_rank0["optimizer_master"] + bytes_rank0["optimizer_adam"]) / 2**20,
                     bytes_rank0["total"] / 2**20, step_s, results[key]["samples_per_s"],
                     results[key]["samples_per_s_per_thread"]])

    summary = {}
    if "zero3_w1" in results and "zero3_w2" in results:
        one, two = results["zero3_w1"]["bytes_per_rank"], results["zero3_w2"]["bytes_per_rank"]
        summary["zero3_bytes_per_rank_2_over_1"] = {c: two[c] / one[c] for c in COMPONENTS
                                                    if one[c]}
        summary["zero3_memory_halved"] = verdict(two["total"] / one["total"], 0.55,
                                                 higher_is_better=False)
    base = results.get("single_w1")
    for key in ("zero2_w2", "zero3_w2", "zero3_w1"):
        if key in results and base:
            summary[f"{key}_samples_per_s_over_single"] = (results[key]["samples_per_s"]
                                                           / base["samples_per_s"])
            summary[f"{key}_per_thread_over_single"] = (
                results[key]["samples_per_s_per_thread"] / base["samples_per_s_per_thread"])
    if "zero3_w2" in results and "zero2_w2" in results:
        summary["zero3_step_over_zero2_step"] = (results["zero3_w2"]["step_s_median"]
                                                 / results["zero2_w2"]["step_s_median"])

    first = next(iter(per_run.values()))[0]
    payload = {"benchmark": "zero", "environment": environment("cpu"),
               "setup": {"config_name": args.config, "config": first["config"],
                         "batch_per_rank": args.batch, "timed_steps_per_launch": args.steps,
                         "warmup": args.warmup, "launch_rounds": repeats,
                         "threads_per_process": args.threads or "cores / ranks",
                         "objectives": "ITC+ITM+MLM",
                         "ds_configs": DS_CONFIGS,
                         "launcher": "deepspeed --num_accelerators N (CPU accelerator, gloo)",
                         "byte_counting": "see vlp/pipeline/bench/zero_worker.py docstring"},
               "results": results, "summary": summary}
    path = write_json(out_path(args, "zero"), payload)
    print(format_table(
        ["run", "ranks", "threads/rank", "params MiB", "grads MiB", "optim MiB", "total MiB",
         "step s", "samples/s", "per thread"], rows,
        title=(f"bench zero: {args.config} ({first['config']['width']}w x "
               f"{first['config']['depth']}), batch {args.batch}/rank, ITC+ITM+MLM, bytes on "
               f"rank 0, median of {len(next(iter(results.values()))['step_s'])} steps")))
    if "zero3_memory_halved" in summary:
        ratios = summary["zero3_bytes_per_rank_2_over_1"]
        print("ZeRO-3 per-rank bytes, 2 ranks / 1 rank: " + ", ".join(
            f"{c} {v:.3f}" for c, v in ratios.items()))
    for key, value in summary.items():
        if key.endswith("_single") or key.endswith("over_zero2_step"):
            print(f"{key}: {value:.2f}")
    print(f"wrote {path}")
    return 0
