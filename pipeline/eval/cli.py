"""`vlp eval retrieval | vqa | nightly`: thin wrappers over evaluate_retrieval, evaluate_vqa and
run_nightly. Results go to stdout as JSON (and to --out); bad input exits with status 2 and a
message naming the file or field.

Retrieval encoding runs on several ranks when started by torchrun/deepspeed (WORLD_SIZE > 1):
    torchrun --nproc_per_node 8 -m vlp.pipeline.cli eval retrieval --checkpoint ... --out r.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def _device(args) -> str:
    """--device, else this rank's GPU (vlp.pipeline.distributed.local_device), else the CPU."""
    import torch

    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.distributed import local_device

    if not args.device:
        return str(local_device())
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible to torch")
    return args.device


def _print(result: dict, stdout) -> None:
    print(json.dumps(result, indent=2), file=stdout)


def _cmd_retrieval(args, stdout) -> int:
    from vlp.pipeline.eval.retrieval.job import evaluate_retrieval

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vlp.pipeline.distributed import init_distributed

        init_distributed(timeout_s=1800)
    result = evaluate_retrieval(
        args.checkpoint, device=_device(args),
        karpathy_json=args.karpathy_json, image_root=args.image_root, split=args.split,
        shards=args.shards, rerank_k=args.rerank_k, batch_size=args.batch_size,
        chunk=args.chunk, bf16=args.bf16, out=args.out,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        _print(result, stdout)
    return 0


def _cmd_vqa(args, stdout) -> int:
    from vlp.pipeline.eval.vqa.job import evaluate_vqa

    _print(evaluate_vqa(
        args.checkpoint, device=_device(args),
        vqa_dir=args.vqa_dir, train_split=args.train_split, eval_split=args.eval_split,
        train_questions=args.train_questions, train_annotations=args.train_annotations,
        eval_questions=args.eval_questions, eval_annotations=args.eval_annotations,
        image_root=args.image_root, image_pattern=args.image_pattern,
        min_answer_count=args.min_answer_count, steps=args.steps, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, finetune_backbone=args.finetune_backbone,
        bf16=args.bf16, seed=args.seed, late_fusion_baseline=args.late_fusion_baseline,
        out=args.out, results_out=args.results,
    ), stdout)
    return 0


def _cmd_nightly(args, stdout) -> int:
    from vlp.pipeline.eval.nightly.runner import run_nightly

    summary = run_nightly(args.runs, suite=args.suite, out_dir=args.out,
                          retry_failed=args.retry_failed, device=_device(args))
    _print(summary, stdout)
    return 1 if summary["failures"] else 0


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
    from vlp.pipeline.cli_help import add_command

    parser = subparsers.add_parser("eval", help="evaluate checkpoints: retrieval, VQA, nightly")
    commands = parser.add_subparsers(dest="eval_command", required=True)

    def add(name: str, func, help: str, example: str) -> argparse.ArgumentParser:
        p = add_command(commands, name, help, [example])
        p.set_defaults(func=_results_on_stdout(func))
        p.add_argument("--device", help="e.g. cpu, cuda:0 (default: this rank's GPU, else cpu)")
        return p

    p = add("retrieval", _cmd_retrieval, "zero-shot image<->text retrieval recall@1/5/10",
            "vlp eval retrieval --checkpoint runs/tiny/checkpoints "
            "--karpathy-json world/retrieval/dataset_synth.json --image-root world/retrieval")
    p.add_argument("--checkpoint", required=True,
                   help="export dir, DeepSpeed tag dir, or checkpoints dir (uses `latest`)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--karpathy-json", help="Karpathy split JSON (with --image-root)")
    data.add_argument("--shards", nargs="+",
                      help="retrieval webdataset tars (image + .txt, one caption per line)")
    p.add_argument("--image-root", help="folder the JSON's filepath/filename are relative to")
    p.add_argument("--split", default="test", help="Karpathy split to evaluate")
    p.add_argument("--rerank-k", type=int, default=0,
                   help="re-rank each query's top K candidates with the ITM head (0 = off)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--chunk", type=int, default=1024, help="queries per score block")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast")
    p.add_argument("--out", help="write the result JSON here (CLIP_benchmark keys)")

    p = add("vqa", _cmd_vqa, "VQAv2: fine-tune the VQA head, official accuracy on the eval split",
            "vlp eval vqa --checkpoint runs/tiny/checkpoints --vqa-dir world/vqa --steps 400")
    p.add_argument("--checkpoint", required=True,
                   help="export dir, DeepSpeed tag dir, or checkpoints dir (uses `latest`)")
    p.add_argument("--vqa-dir", help="folder with *_{split}_questions.json / _annotations.json")
    p.add_argument("--train-split", default="train",
                   help="split name in --vqa-dir's file names to fine-tune on")
    p.add_argument("--eval-split", default="val", help="split name in --vqa-dir to score")
    for split in ("train", "eval"):
        for kind in ("questions", "annotations"):
            p.add_argument(f"--{split}-{kind}", help=f"explicit {split} {kind} JSON")
    p.add_argument("--image-root", help="images folder (default: the questions file's folder)")
    p.add_argument("--image-pattern",
                   help="image path under the root, formatted with the questions file's "
                        "data_subtype and the image id, e.g. "
                        "'{split}/COCO_{split}_{image_id:012d}.jpg' (default: auto)")
    p.add_argument("--min-answer-count", type=int, default=9,
                   help="answer vocabulary: normalised training answers given this often")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="fine-tune for exactly this many steps")
    budget.add_argument("--epochs", type=float, default=1.0, help="or this many epochs")
    p.add_argument("--lr", type=float, help="default 1e-3 (head only), 1e-4 (--finetune-backbone)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per fine-tune step")
    p.add_argument("--finetune-backbone", action="store_true",
                   help="train the whole model, not only the VQA head")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and inference")
    p.add_argument("--seed", type=int, default=0, help="fine-tune seed (head init, order)")
    p.add_argument("--late-fusion-baseline", action="store_true",
                   help="also fine-tune a late-fusion head (unimodal CLS states, no fused "
                        "layer) with the same budget and report it as a baseline")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--results",
                   help="official results file [{question_id, answer}] "
                        "(default: beside --out, .results.json)")

    p = add("nightly", _cmd_nightly,
            "evaluate new checkpoints of all runs; results.parquet, TensorBoard, report.html "
            "(exit status 1 when a checkpoint failed in this run)",
            "vlp eval nightly --runs runs --suite eval_suite.yaml")
    p.add_argument("--runs", required=True, help="folder of runs (runs/NAME/checkpoints/...)")
    p.add_argument("--suite", help="benchmark suite YAML/JSON (default RUNS/eval_suite.yaml)")
    p.add_argument("--out", help="output folder (default RUNS/nightly)")
    p.add_argument("--retry-failed", action="store_true",
                   help="evaluate again what failed before (default: failures are final)")
