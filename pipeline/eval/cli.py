"""`vlp eval retrieval | vqa | caption | zeroshot | linear-probe | compositionality | nightly`:
thin wrappers over evaluate_retrieval, evaluate_vqa, evaluate_caption, evaluate_zeroshot,
evaluate_linear_probe, evaluate_compositionality and run_nightly. A job's options are the fields
of its config (configs.py), plus --checkpoint, --device, --out (and --results). Results go to
stdout as JSON (and to --out); bad input exits with status 2 and a message naming the file or
field.

Retrieval encoding runs on several ranks when started by torchrun/deepspeed (WORLD_SIZE > 1):
    torchrun --nproc_per_node 8 -m vlp.pipeline.cli eval retrieval --checkpoint ... --out r.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

from vlp.pipeline.cli_help import add_command
from vlp.pipeline.eval.job_config import add_config_arguments, config_from_args
from vlp.pipeline.eval.jobs import JOBS, EvalJob


def _device(args) -> str:
    """--device, else this rank's GPU (vlp.pipeline.distributed.local_device), else the CPU."""
    import torch

    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.distributed import local_device

    if not args.device:
        return str(local_device())
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device} is not a device; use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: evaluation runs on cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible to torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA "
                        "device(s), numbered from 0")
    return args.device


def _output_file(text: str) -> str:
    """argparse `type=` for a result file: an existing directory is refused before the job runs
    (the result would be computed, then fail to replace the directory)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name the file to write, e.g. "
                                         f"{Path(text) / 'result.json'}")
    return text


def _print(result: dict, stdout) -> None:
    print(json.dumps(result, indent=2), file=stdout)


def _run_job(job: EvalJob, args, stdout) -> int:
    """Build the job's config (its inputs are checked before any model loads), run it, print
    the result on rank 0."""
    config = config_from_args(job.config, args)
    if job.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vlp.pipeline.distributed import init_distributed

        init_distributed(timeout_s=1800)
    files = {"results_out": args.results} if job.results_file else {}
    result = job.evaluate()(args.checkpoint, config, out=args.out, device=_device(args), **files)
    if int(os.environ.get("RANK", "0")) == 0:
        _print(result, stdout)
    return 0


def _cmd_nightly(args, stdout) -> int:
    from vlp.pipeline.eval.nightly.regressions import check_margin
    from vlp.pipeline.eval.nightly.runner import run_nightly

    margin = ({"regression_margin": check_margin(args.regression_margin)}
              if "regression_margin" in args else {})
    summary = run_nightly(args.runs, suite=args.suite, out_dir=args.out,
                          retry_failed=args.retry_failed, device=_device(args), **margin)
    _print(summary, stdout)
    if summary["failures"]:
        return 1
    return 4 if args.fail_on_regression and summary["regressions"] else 0


def _results_on_stdout(func):
    """Only the result JSON goes to stdout: what libraries print meanwhile (DeepSpeed logs its
    accelerator choice to stdout on import) goes to stderr, so `vlp eval ... > result.json` stays
    valid JSON. Bad input raises UserError, which the `vlp` command prints as one line (exit 2)."""

    def run(args) -> int:
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return func(args, stdout)

    return run


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: retrieval, VQA, captioning, classification, nightly")
    commands = parser.add_subparsers(dest="eval_command", required=True)
    for job in JOBS:
        p = _add_command(commands, job.name, functools.partial(_run_job, job), job.help,
                         job.example)
        p.add_argument("--checkpoint", required=True,
                       help="export dir, DeepSpeed tag dir, or checkpoints dir (uses `latest`)")
        add_config_arguments(p, job.config)
        p.add_argument("--out", type=_output_file, help="write the result JSON here")
        if job.results_file:
            p.add_argument("--results", type=_output_file,
                           help=f"{job.results_file} (default: beside --out, .results.json)")
    _add_nightly(commands)


def _add_command(commands, name: str, func, help: str, example: str) -> argparse.ArgumentParser:
    """A job's parser with the option every job shares, --device."""
    p = add_command(commands, name, help, [example])
    p.set_defaults(func=_results_on_stdout(func))
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: this rank's GPU, else cpu)")
    return p


def _add_nightly(commands) -> None:
    """`vlp eval nightly`."""
    p = _add_command(commands, "nightly", _cmd_nightly,
            "evaluate new checkpoints of all runs; results.parquet, TensorBoard, report.html "
            "(exit status 1 when a checkpoint failed in this run, 4 on a regression with "
            "--fail-on-regression)",
            "vlp eval nightly --runs runs --suite eval_suite.yaml")
    p.add_argument("--runs", required=True, help="folder of runs (runs/NAME/checkpoints/...)")
    p.add_argument("--suite", help="benchmark suite YAML/JSON (default RUNS/eval_suite.yaml)")
    p.add_argument("--out", help="output folder (default RUNS/nightly); one run at a time holds "
                                 "its nightly.lock")
    p.add_argument("--retry-failed", action="store_true",
                   help="evaluate again what failed before (default: failures are final)")
    p.add_argument("--regression-margin", type=float, default=argparse.SUPPRESS,
                   help="flag a metric whose latest value is more than this fraction below its "
                        "run's best (default 0.05)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit with status 4 when a metric regressed (for cron or CI)")
