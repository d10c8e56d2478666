"""`vlp bench comms`: the collectives a ZeRO training step sends, measured and predicted, and the
host time of ZeRO-3's per-module hooks.

Measured on a two-node world on loopback, as a multi-node job runs: two `vlp train` launchers
(`--hostfile H --master-addr 127.0.0.1 --node-rank N`, one rank each, deepspeed `--no_ssh`) train
`--config` on synthetic JPEG shards for `--steps` steps, once per `--ds-configs` file, each copied
with DeepSpeed's comms logger switched on. The trainer writes every step's collectives
(vlp.pipeline.train.comms). ZeRO-3 records its module trace in the first two steps, so steps 3
onwards are the steady state; they must agree on both ranks. Each op's calls, bytes and message
sizes per step are then compared with vlp.pipeline.bench.zero_traffic's prediction for the same
model, config and world size, in the dtype training used. On a CPU without native bf16 that is
fp32 (vlp.pipeline.distributed.fast_bf16): the same prediction in bf16 (2 bytes per element,
same calls) is what a GPU run sends, and is reported beside it.

Each run also saves one checkpoint at its last step: the bytes each rank wrote and the save's
seconds (as training logs it, checkpoint/save_s) are reported beside 12 bytes per parameter /
world, the model vlp.pipeline.bench.scaling projects checkpoints with (the fp32 master weights and
Adam's two moments, partitioned; ZeRO-1/2's rank 0 also writes the whole module).

The same one-rank probe that records the module order (vlp.pipeline.bench.zero3_probe) times
ZeRO-3's per-module hooks under --hooks-ds-config and fits the host CPU time of one hook call as
a + b x (the module's own parameters).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from vlp.pipeline.bench.common import (
    QUICK_MODEL,
    environment,
    format_table,
    median,
    out_path,
    resolve_device,
    worker_launch_command,
    write_json,
)
from vlp.pipeline.bench.zero_traffic import ModelTrace, ZeroSettings, step_collectives, summarize

DEFAULT_CONFIGS = "zero3_cpu.json,zero3_bf16.json"
STEADY_FROM = 3  # ZeRO-3 runs without a module trace in step 1 and records it in step 2
RANK_FILE = re.compile(r"(?:zero_pp_rank_|vlp_rank)(\d+)")  # a rank's own files in a tag
PROBE = "vlp.pipeline.bench.zero3_probe"


def add_arguments(p) -> None:
    p.add_argument("--config", default="small", help="model size (default small)")
    p.add_argument("--ds-configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated DeepSpeed configs, shipped names or paths "
                        f"(default {DEFAULT_CONFIGS}; empty: only time the hooks)")
    p.add_argument("--steps", type=int, default=4, help=f"training steps (>= {STEADY_FROM})")
    p.add_argument("--batch", type=int, default=2, help="per rank")
    p.add_argument("--image-size", type=int, default=96,
                   help="pixels (default 96: the model's parameters do not depend on it, except "
                        "the position table, so a small image keeps the run short)")
    p.add_argument("--hook-steps", type=int, default=3, help="timed hook steps (0: skip)")
    p.add_argument("--hooks-ds-config", default="zero3_bf16.json",
                   help="the ZeRO-3 config the hooks are timed under (default zero3_bf16.json: "
                        "the GPU config whose host cost docs/scaling.md projects)")
    p.add_argument("--data-dir", help="where to write/reuse the shards (default beside --out)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per launch")


def model_overrides(args) -> dict:
    if args.quick:
        return dict(QUICK_MODEL, vocab_size=None)  # the vocabulary comes from the tokenizer
    return {"image_size": args.image_size}


def run(args) -> int:
    from vlp.pipeline.bench.loader import write_jpeg_shards
    from vlp.pipeline.data.errors import UserError

    if args.quick:
        args.steps, args.hook_steps = STEADY_FROM, 1
    if args.steps < STEADY_FROM:
        raise UserError(f"--steps {args.steps}: the steady state starts at step {STEADY_FROM}")
    names = [name.strip() for name in args.ds_configs.split(",") if name.strip()]
    if not names and not args.hook_steps:
        raise UserError("nothing to measure: --ds-configs is empty and --hook-steps is 0")
    configs = {name: _read_ds_config(name) for name in names}  # bad names fail before any work
    if args.hook_steps and _read_ds_config(args.hooks_ds_config).get(
            "zero_optimization", {}).get("stage") != 3:
        raise UserError(f"--hooks-ds-config {args.hooks_ds_config} is not a ZeRO-3 config: "
                        "only ZeRO-3 has per-module hooks")
    path = out_path(args, "comms")
    data_dir = Path(args.data_dir) if args.data_dir else path.with_name("comms_data")
    write_jpeg_shards(data_dir, shards=2, per_shard=max(32, 4 * args.batch), source_size=96)
    probe = run_probe(args.config, _model_overrides_with_vocab(args, data_dir),
                      hook_steps=args.hook_steps, ds_config=args.hooks_ds_config,
                      batch=args.batch, timeout=args.timeout)
    trace = ModelTrace(**probe["trace"])
    hooks = summarize_hooks(probe["hooks"]) if "hooks" in probe else None
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlp_bench_comms_") as tmp:
        for name, ds_config in configs.items():
            results[name] = measure_config(name, ds_config, trace, args, data_dir, Path(tmp))
    payload = {"benchmark": "comms", "environment": environment(resolve_device(None)),
               "setup": {"model": args.config, "model_overrides": model_overrides(args),
                         "world": "2 nodes x 1 rank on loopback (two launchers, --no_ssh)",
                         "steps": args.steps, "steady_from_step": STEADY_FROM,
                         "batch_per_rank": args.batch},
               "results": results, "hooks": hooks,
               "all_match": all(r["match"] for r in results.values())}
    write_json(path, payload)
    if results:
        print(_table(results))
        print(f"measured == predicted for every op and size: {payload['all_match']}")
    if hooks:
        print(_hooks_line(hooks))
    print(f"wrote {path}")
    return 0 if payload["all_match"] else 1


# ---- collectives -----------------------------------------------------------------------------

def _read_ds_config(name: str) -> dict:
    from vlp.pipeline.train.config import find_ds_config

    return json.loads(find_ds_config(name).read_text())


def measure_config(name: str, ds_config: dict, trace, args, data_dir: Path, tmp: Path) -> dict:
    """Train two nodes with `ds_config` (comms logger on); the steady step, measured and
    predicted."""
    logged = tmp / f"logged_{Path(name).name}"
    logged.write_text(json.dumps({**ds_config, "comms_logger": {"enabled": True}}))
    run_dir = tmp / f"run_{Path(name).stem}"
    _train_two_nodes(run_dir, logged, args, data_dir)
    steady = _steady_step(run_dir)
    measured = _by_op(steady["ops"])
    dtype_bytes = _training_dtype_bytes(ds_config)
    predicted = _predict(trace, ds_config, world=2, dtype_bytes=dtype_bytes)
    itc = _predict_itc(args, world=2)
    return {"ds_config": name, "zero_stage": ds_config.get("zero_optimization", {}).get("stage"),
            "dtype_bytes": dtype_bytes, "measured": measured, "predicted": predicted,
            "predicted_bf16": _predict(trace, ds_config, world=2, dtype_bytes=2),
            "itc_gather": {"measured": steady["itc_gather"], "predicted": itc},
            "checkpoint": checkpoint_cost(run_dir, world=2, parameters=sum(trace.numel.values()),
                                          zero_stage=ZeroSettings.from_ds_config(ds_config).stage,
                                          weight_bytes=dtype_bytes),
            "match": measured == predicted and steady["itc_gather"] == itc}


def checkpoint_cost(run_dir: Path, world: int, parameters: int, zero_stage: int,
                    weight_bytes: int) -> dict:
    """The run's last checkpoint: the bytes each rank wrote (a rank's own files carry its number;
    the rest rank 0 writes), its save's seconds, and the model's bytes per rank."""
    ckpt = run_dir / "checkpoints"
    tag = ckpt / (ckpt / "latest").read_text().strip()
    per_rank = [0] * world
    for path in tag.iterdir():
        match = RANK_FILE.search(path.name)
        per_rank[int(match[1]) if match else 0] += path.stat().st_size
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"tag": tag.name, "bytes_per_rank": per_rank,
            "save_s": summary["checkpoint_save_s"][str(summary["step"])],
            "predicted_bytes_per_rank": checkpoint_bytes(parameters, world, zero_stage,
                                                         weight_bytes)}


def checkpoint_bytes(parameters: int, world: int, zero_stage: int, weight_bytes: int) -> list:
    """Bytes each rank writes in a checkpoint, by the model: 12 per parameter / world (fp32
    master weights and Adam's two moments, partitioned), and under ZeRO-1/2 rank 0 also the
    whole module in the training dtype (`weight_bytes` per parameter)."""
    shard = 12 * parameters // world
    return [shard + (parameters * weight_bytes if zero_stage < 3 and rank == 0 else 0)
            for rank in range(world)]


def _train_two_nodes(run_dir: Path, ds_config: Path, args, data_dir: Path) -> None:
    from vlp.pipeline.bench.loader import shard_urls
    from vlp.pipeline.distributed import free_port, remove_shm_buffers
    from vlp.pipeline.train.launch import launcher_command

    hostfile = run_dir.with_suffix(".hostfile")
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    overrides = [f"run_dir={run_dir}", f"ds_config={ds_config}",
                 f"data.shards={shard_urls(data_dir)}", f"data.tokenizer={data_dir / 'tokenizer'}",
                 "data.num_workers=1", f"model.name={args.config}",
                 f"model.overrides={json.dumps(_train_overrides(args))}",
                 f"optim.batch_size={args.batch}", f"optim.max_steps={args.steps}",
                 "optim.warmup_steps=1", f"checkpoint.every_steps={args.steps}",
                 f"logging.every_steps={args.steps}", "logging.peak_tflops=1",
                 "logging.progress_bar=false", f"dist_timeout_s={args.timeout}"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes, logs = [], []
    try:
        for rank in (0, 1):
            logs.append(open(run_dir.with_suffix(f".node{rank}.log"), "w"))
            cmd = launcher_command(None, overrides, hostfile=str(hostfile),
                                   master_addr="127.0.0.1", master_port=port, node_rank=rank)
            nodes.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        codes = [node.wait(timeout=args.timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
        for log in logs:
            log.close()
        remove_shm_buffers(port)
    if codes != [0, 0]:
        tail = run_dir.with_suffix(".node0.log").read_text()[-3000:]
        raise RuntimeError(f"training with {ds_config.name} exited {codes}:\n{tail}")


def _train_overrides(args) -> dict:
    return {k: v for k, v in model_overrides(args).items() if v is not None}


def _steady_step(run_dir: Path) -> dict:
    """The collectives of one steady-state step ({"ops": DeepSpeed's, "itc_gather": {phase:
    {"calls", "bytes"}}}), after checking every such step on every rank sent the same ones."""
    steps = []
    for rank in (0, 1):
        lines = (run_dir / "comms" / f"rank{rank}.jsonl").read_text().splitlines()
        steps += [json.loads(line) for line in lines if json.loads(line)["step"] >= STEADY_FROM]
    distinct = {json.dumps({"ops": record["ops"], "itc_gather": {
        phase: {"calls": entry["calls"], "bytes": entry["bytes"]}
        for phase, entry in record["itc_gather"].items()}}, sort_keys=True) for record in steps}
    if len(distinct) != 1:
        raise RuntimeError(f"{run_dir}: steady-state steps differ between steps or ranks: "
                           f"{sorted(distinct)}")
    return json.loads(distinct.pop())


def _model_overrides_with_vocab(args, data_dir: Path) -> dict:
    """The overrides that make `--config` the model training builds: the tokenizer's vocabulary."""
    from vlp.pipeline.data.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(str(data_dir / "tokenizer")))
    return {**_train_overrides(args), "vocab_size": vocab}


def _training_dtype_bytes(ds_config: dict) -> int:
    """Bytes per element of the weights on this machine, as the trainer decides them."""
    from vlp.pipeline.distributed import fast_bf16

    half = ds_config.get("bf16", {}).get("enabled") and fast_bf16("cpu")
    return 2 if half or ds_config.get("fp16", {}).get("enabled") else 4


def _predict(trace, ds_config: dict, world: int, dtype_bytes: int) -> dict:
    calls = step_collectives(trace, ZeroSettings.from_ds_config(ds_config), world, dtype_bytes)
    return _by_op({op: {str(size): n for size, n in entry["sizes"].items()}
                   for op, entry in summarize(calls).items()})


def _predict_itc(args, world: int) -> dict:
    """The ITC gathers' calls and bytes per step and phase (vlp.pipeline.bench.scaling's model;
    the embeddings are fp32 in every training dtype)."""
    from vlp.models.config import load_config
    from vlp.pipeline.bench.scaling import itc_gathers, value

    embed_dim = load_config(args.config, **_train_overrides(args)).embed_dim
    predicted = {"forward": {"calls": 0, "bytes": 0}, "backward": {"calls": 0, "bytes": 0}}
    for call in itc_gathers(args.batch, embed_dim, world, value("itc_dtype_bytes")):
        entry = predicted[call.phase.removeprefix("ITC ")]
        entry["calls"] += 1
        entry["bytes"] += call.total_elements(world) * call.dtype_bytes
    return predicted


def _by_op(ops: dict[str, dict[str, int]]) -> dict[str, dict]:
    """{op: {"calls", "bytes", "sizes": {bytes: calls}}} from {op: {bytes: calls}}."""
    return {op: {"calls": sum(sizes.values()),
                 "bytes": sum(int(size) * n for size, n in sizes.items()),
                 "sizes": dict(sorted(sizes.items(), key=lambda item: int(item[0])))}
            for op, sizes in sorted(ops.items())}


def _table(results: dict) -> str:
    rows = []
    for name, result in results.items():
        for op in sorted(set(result["measured"]) | set(result["predicted"])):
            measured = result["measured"].get(op, {"calls": 0, "bytes": 0, "sizes": {}})
            predicted = result["predicted"].get(op, {"calls": 0, "bytes": 0})
            sizes = measured["sizes"]
            rows.append([name, op, measured["calls"], predicted["calls"],
                         measured["bytes"] / 2**20, predicted["bytes"] / 2**20,
                         result["predicted_bf16"].get(op, {"bytes": 0})["bytes"] / 2**20,
                         len(sizes), int(max(sizes, key=int)) / 2**20 if sizes else 0,
                         measured == result["predicted"].get(op)])
        itc = result["itc_gather"]
        for phase, measured in itc["measured"].items():
            predicted = itc["predicted"][phase]
            rows.append([name, f"ITC {phase} gather", measured["calls"], predicted["calls"],
                         measured["bytes"] / 2**20, predicted["bytes"] / 2**20,
                         predicted["bytes"] / 2**20, "", "",  # fp32 in every dtype
                         measured == predicted])
    return format_table(["ds config", "op", "calls", "predicted", "MiB", "predicted MiB",
                         "bf16 MiB", "sizes", "largest MiB", "match"], rows,
                        title="bench comms: one steady-state step per rank, 2 nodes x 1 rank")


# ---- hooks -----------------------------------------------------------------------------------

def run_probe(config: str, overrides: dict, hook_steps: int = 0, ds_config: str | None = None,
              batch: int = 2, timeout: int = 600) -> dict:
    """zero3_probe on one rank through the deepspeed launcher: {"trace": ..., "hooks": ...}."""
    with tempfile.TemporaryDirectory(prefix="vlp_zero3_probe_") as tmp:
        out = Path(tmp) / "probe.json"
        worker_args = ["--out", str(out), "--config", config, "--overrides", json.dumps(overrides),
                       "--hook-steps", str(hook_steps), "--batch", str(batch)]
        if ds_config:
            worker_args += ["--ds-config", ds_config]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(worker_launch_command(PROBE, worker_args, ranks=1), env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the ZeRO-3 probe failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(out.read_text())


def summarize_hooks(hooks: dict) -> dict:
    """The probe's hook timing with totals per step and the per-call fit."""
    hooks = dict(hooks)
    calls = hooks.pop("calls")
    kinds = hooks["per_kind"].values()
    return {**hooks, "calls_per_step": sum(kind["calls_per_step"] for kind in kinds),
            "hook_s_per_step": sum(kind["seconds_per_step"] for kind in kinds),
            "fit": fit_per_call(calls)}


def fit_per_call(calls: list) -> dict:
    """Least squares of one call's CPU seconds on its module's own parameter count: a + b x k,
    and the median call."""
    ks = [k for _, k, _ in calls]
    ts = [t for _, _, t in calls]
    n, mean_k, mean_t = len(ks), sum(ks) / len(ks), sum(ts) / len(ts)
    var_k = sum((k - mean_k) ** 2 for k in ks)
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / var_k if var_k else 0.0
    return {"calls": n, "intercept_s": mean_t - slope * mean_k, "per_parameter_s": slope,
            "mean_s": mean_t, "median_s": median(ts)}


def _hooks_line(hooks: dict) -> str:
    fit = hooks["fit"]
    steps = hooks["fwd_bwd_wall_s_median"]
    return (f"ZeRO-3 hooks ({hooks['ds_config']}, 1 rank, {hooks['modules']} modules): "
            f"{hooks['calls_per_step']} calls and {1e3 * hooks['hook_s_per_step']:.0f} ms CPU per "
            f"step; per call {1e6 * fit['intercept_s']:.1f} us + "
            f"{1e6 * fit['per_parameter_s']:.2f} us x own parameters (median "
            f"{1e6 * fit['median_s']:.1f} us); fwd+bwd wall {steps['zero3']:.2f} s with ZeRO-3 vs "
            f"{steps['plain']:.2f} s plain")
