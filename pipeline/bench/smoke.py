"""`vlp bench smoke`: a short real pretraining run on this machine's devices, resumed, evaluated.

What a lent GPU must show before any benchmark (launch_scripts/gpu_check.sh runs it first):
synthetic JPEG shards in img2dataset's layout -> `vlp train` through the deepspeed launcher on the
visible GPUs (at most --ranks; the CPU ranks elsewhere) with the given DeepSpeed config, stopped at
half the steps -> a second launch that resumes from that checkpoint and finishes -> retrieval
evaluation of the last checkpoint on the device (the shards double as the test set: this checks
that the paths run, not how well the model does). Reports each launch's exit code and time, and
the losses, samples/s, MFU and data-wait share that training logged.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlp.pipeline.bench.common import (
    environment,
    format_table,
    out_path,
    record_figure,
    write_json,
)


def add_arguments(p) -> None:
    p.add_argument("--ds-config", help="DeepSpeed config (default: zero3_bf16.json on a GPU, "
                                       "zero3_cpu.json on a CPU)")
    p.add_argument("--model", default="tiny", help="model size (default tiny)")
    p.add_argument("--ranks", type=int, default=2, help="at most this many ranks (default 2)")
    p.add_argument("--steps", type=int, default=40, help="training steps in all (default 40)")
    p.add_argument("--batch", type=int, default=32, help="per rank (default 32)")
    p.add_argument("--data-dir", help="where to write/reuse the shards (default beside --out)")


def _ranks(limit: int) -> int:
    import torch

    return min(limit, torch.cuda.device_count()) if torch.cuda.is_available() else limit


def _launch(label: str, run_dir: Path, data_dir: Path, args, max_steps: int, ranks: int) -> dict:
    from vlp.pipeline.bench.loader import shard_urls
    from vlp.pipeline.train.launch import run_training

    overrides = [f"run_dir={run_dir}", f"ds_config={args.ds_config}",
                 f"data.shards={shard_urls(data_dir)}", f"data.tokenizer={data_dir / 'tokenizer'}",
                 f"model.name={args.model}", "model.overrides={image_size: 64, patch_size: 8}",
                 f"optim.batch_size={args.batch}", f"optim.max_steps={max_steps}",
                 f"optim.warmup_steps={max(1, args.steps // 4)}", "data.num_workers=1",
                 f"checkpoint.every_steps={max(1, args.steps // 2)}", "logging.every_steps=5"]
    start = time.perf_counter()
    code = run_training(None, overrides, nproc=ranks)
    launch = {"exit_code": code, "seconds": time.perf_counter() - start}
    logged = _logged(run_dir)
    record_figure("smoke", ds_config=args.ds_config, ranks=ranks, launch=label, **launch,
                  last_logged=logged[-1] if logged else None)
    return launch


def _logged(run_dir: Path) -> list[dict]:
    """What training logged (metrics.jsonl), in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run(args) -> int:
    import torch

    from vlp.pipeline.bench.loader import write_jpeg_shards
    from vlp.pipeline.data.model_loading import load_model
    from vlp.pipeline.distributed import local_device
    from vlp.pipeline.eval.configs import RetrievalConfig
    from vlp.pipeline.eval.retrieval.job import evaluate_retrieval

    gpu = torch.cuda.is_available()
    args.ds_config = args.ds_config or ("zero3_bf16.json" if gpu else "zero3_cpu.json")
    if args.quick:
        args.steps, args.batch = 4, 4
    ranks = _ranks(args.ranks)
    path = out_path(args, "smoke")
    run_dir = path.with_name(path.stem + "_run")
    data_dir = Path(args.data_dir) if args.data_dir else path.with_name("smoke_data")
    shards = max(2, ranks)  # one loader worker per rank needs a shard each
    write_jpeg_shards(data_dir, shards, per_shard=max(64, 4 * args.batch), source_size=96)

    launches = {"first": _launch("first", run_dir, data_dir, args, max(1, args.steps // 2), ranks)}
    if launches["first"]["exit_code"] == 0:
        launches["resumed"] = _launch("resumed", run_dir, data_dir, args, args.steps, ranks)
    records = _logged(run_dir)
    evaluation = None
    if launches.get("resumed", {}).get("exit_code") == 0:
        loaded = load_model(run_dir / "checkpoints", device=local_device())
        config = RetrievalConfig(shards=tuple(sorted(map(str, data_dir.glob("*.tar")))),
                                 bf16=gpu, rerank_k=4)
        result = evaluate_retrieval(loaded, config)
        evaluation = {"device": str(local_device()), "metrics": result["metrics"],
                      "seconds": result["seconds"]}
        record_figure("smoke", ds_config=args.ds_config, evaluation=evaluation)
    ok = all(launch["exit_code"] == 0 for launch in launches.values()) and len(launches) == 2
    payload = {"benchmark": "smoke", "environment": environment("cuda" if gpu else "cpu"),
               "setup": {"ds_config": args.ds_config, "model": args.model, "ranks": ranks,
                         "steps": args.steps, "batch_per_rank": args.batch},
               "launches": launches, "logged": records, "evaluation": evaluation, "ok": ok}
    write_json(path, payload)
    rows = [[r["step"], r.get("loss/total"), r.get("perf/samples_per_s"),
             100 * r.get("perf/mfu", 0.0), r.get("perf/data_wait_share")] for r in records]
    print(format_table(["step", "loss", "samples/s", "MFU %", "data wait"], rows,
                       title=f"bench smoke: {args.model}, {ranks} rank(s), {args.ds_config}"))
    print(f"launches: {launches}; retrieval on the device: "
          f"{evaluation['metrics'] if evaluation else 'not run'}; ok={ok}")
    return 0 if ok else 1
