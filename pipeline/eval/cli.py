"""`vlp eval retrieval | vqa | caption | zeroshot | linear-probe | compositionality | nightly`:
thin wrappers over evaluate_retrieval, evaluate_vqa, evaluate_caption, evaluate_zeroshot,
evaluate_linear_probe, evaluate_compositionality and run_nightly. Results go to stdout as JSON
(and to --out); bad input exits with status 2 and a message naming the file or field.

Retrieval encoding runs on several ranks when started by torchrun/deepspeed (WORLD_SIZE > 1):
    torchrun --nproc_per_node 8 -m vlp.pipeline.cli eval retrieval --checkpoint ... --out r.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from vlp.pipeline.cli_help import add_command, nonnegative_int, positive_int


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


def _cmd_caption(args, stdout) -> int:
    from vlp.pipeline.data.checkpoints import load_model
    from vlp.pipeline.eval.caption.job import evaluate_caption

    _print(evaluate_caption(
        load_model(args.checkpoint, device=_device(args)),
        karpathy_json=args.karpathy_json, image_root=args.image_root, split=args.split,
        train_splits=args.train_split or ("train", "restval"), steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, beam_size=args.beam_size, max_length=args.max_length,
        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        spice=not args.no_spice, bf16=args.bf16, seed=args.seed, out=args.out,
        results_out=args.results,
    ), stdout)
    return 0


def _cmd_zeroshot(args, stdout) -> int:
    from vlp.pipeline.data.checkpoints import load_model
    from vlp.pipeline.eval.classification.zeroshot import evaluate_zeroshot

    _print(evaluate_zeroshot(
        load_model(args.checkpoint, device=_device(args)), dataset=args.dataset, split=args.split,
        classnames=args.classnames, templates=args.templates, batch_size=args.batch_size,
        bf16=args.bf16, out=args.out,
    ), stdout)
    return 0


def _cmd_linear_probe(args, stdout) -> int:
    from vlp.pipeline.data.checkpoints import load_model
    from vlp.pipeline.eval.classification.probe import evaluate_linear_probe

    _print(evaluate_linear_probe(
        load_model(args.checkpoint, device=_device(args)), dataset=args.dataset,
        train_split=args.train_split, val_split=args.val_split, test_split=args.test_split,
        val_proportion=args.val_proportion, classnames=args.classnames, lr=args.lr,
        epochs=args.epochs, probe_batch_size=args.probe_batch_size, seed=args.seed,
        batch_size=args.batch_size, bf16=args.bf16, out=args.out,
    ), stdout)
    return 0


def _cmd_compositionality(args, stdout) -> int:
    from vlp.pipeline.eval.compositionality.job import evaluate_compositionality

    _print(evaluate_compositionality(
        args.checkpoint, device=_device(args), edits=args.edits, image_root=args.image_root,
        itm=not args.no_itm, batch_size=args.batch_size, bf16=args.bf16, out=args.out,
    ), stdout)
    return 0


def _cmd_nightly(args, stdout) -> int:
    from vlp.pipeline.eval.nightly.regressions import check_margin
    from vlp.pipeline.eval.nightly.runner import run_nightly

    summary = run_nightly(args.runs, suite=args.suite, out_dir=args.out,
                          retry_failed=args.retry_failed, device=_device(args),
                          regression_margin=check_margin(args.regression_margin))
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


def _add_finetune_outputs(p: argparse.ArgumentParser, results_file: str) -> None:
    """The options every fine-tuning job shares: precision, seed and its two output files."""
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and inference")
    p.add_argument("--seed", type=int, default=0, help="fine-tune seed (head init, order)")
    p.add_argument("--out", type=_output_file, help="write the metrics JSON here")
    p.add_argument("--results", type=_output_file,
                   help=f"{results_file} (default: beside --out, .results.json)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: retrieval, VQA, captioning, classification, nightly")
    commands = parser.add_subparsers(dest="eval_command", required=True)

    def add(name: str, func, help: str, example: str,
            checkpoint: bool = True) -> argparse.ArgumentParser:
        """A job's parser with the options every job shares: --device and (one checkpoint per
        job) --checkpoint."""
        p = add_command(commands, name, help, [example])
        p.set_defaults(func=_results_on_stdout(func))
        p.add_argument("--device", help="e.g. cpu, cuda:0 (default: this rank's GPU, else cpu)")
        if checkpoint:
            p.add_argument("--checkpoint", required=True,
                           help="export dir, DeepSpeed tag dir, or checkpoints dir (uses `latest`)")
        return p

    for add_job in (_add_retrieval, _add_vqa, _add_caption, _add_classification,
                    _add_compositionality, _add_nightly):
        add_job(add)

def _add_retrieval(add) -> None:
    """`vlp eval retrieval`."""
    p = add("retrieval", _cmd_retrieval, "zero-shot image<->text retrieval recall@1/5/10",
            "vlp eval retrieval --checkpoint runs/tiny/checkpoints "
            "--karpathy-json world/retrieval/dataset_synth.json --image-root world/retrieval")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--karpathy-json", help="Karpathy split JSON (with --image-root)")
    data.add_argument("--shards", nargs="+",
                      help="retrieval webdataset tars (image + .txt, one caption per line)")
    p.add_argument("--image-root", help="folder the JSON's filepath/filename are relative to")
    p.add_argument("--split", default="test", help="Karpathy split to evaluate")
    p.add_argument("--rerank-k", type=nonnegative_int, default=0,
                   help="re-rank each query's top K candidates with the ITM head (0 = off)")
    p.add_argument("--chunk", type=positive_int, default=1024, help="queries per score block")
    _add_encoding_options(p, "write the result JSON here (CLIP_benchmark keys)")

def _add_vqa(add) -> None:
    """`vlp eval vqa`."""
    p = add("vqa", _cmd_vqa, "VQAv2: fine-tune the VQA head, official accuracy on the eval split",
            "vlp eval vqa --checkpoint runs/tiny/checkpoints --vqa-dir world/vqa --steps 400")
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
    budget.add_argument("--steps", type=nonnegative_int,
                        help="fine-tune for exactly this many steps")
    budget.add_argument("--epochs", type=float, default=1.0, help="or this many epochs")
    p.add_argument("--lr", type=float, help="default 1e-3 (head only), 1e-4 (--finetune-backbone)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="questions per fine-tune step")
    p.add_argument("--finetune-backbone", action="store_true",
                   help="train the whole model, not only the VQA head")
    p.add_argument("--late-fusion-baseline", action="store_true",
                   help="also fine-tune a late-fusion head (unimodal CLS states, no fused "
                        "layer) with the same budget and report it as a baseline")
    _add_finetune_outputs(p, "official results file [{question_id, answer}]")

def _add_caption(add) -> None:
    """`vlp eval caption`."""
    p = add("caption", _cmd_caption,
            "image captioning on a Karpathy split: COCO caption metrics (BLEU, METEOR, ROUGE-L, "
            "CIDEr, SPICE when installed) with baselines, optionally after a fine-tune",
            "vlp eval caption --checkpoint runs/tiny/checkpoints "
            "--karpathy-json world/dataset_synth.json --image-root world --steps 150")
    p.add_argument("--karpathy-json", required=True,
                   help="Karpathy split JSON (dataset_coco.json layout) with references")
    p.add_argument("--image-root", required=True,
                   help="folder the JSON's filepath/filename are relative to")
    p.add_argument("--split", default="test", help="split to caption")
    p.add_argument("--train-split", action="append",
                   help="training split for the fine-tune and the baselines; repeat for several "
                        "(default: train and restval, those present)")
    p.add_argument("--steps", type=int, default=0,
                   help="captioning fine-tune steps before decoding (default 0: the checkpoint "
                        "must have been pretrained with model.lm_weight > 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate")
    p.add_argument("--batch-size", type=positive_int, default=32, help="pairs per fine-tune step")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    p.add_argument("--max-length", type=int, default=30, help="most tokens per caption")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-probability / length ** this")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="forbid repeating an n-gram of this size (0 = off)")
    p.add_argument("--no-spice", action="store_true",
                   help="skip SPICE (it is reported unavailable anyway without its models)")
    _add_finetune_outputs(p, "COCO results file [{image_id, caption}]")

def _add_classification(add) -> None:
    """`vlp eval zeroshot` and `vlp eval linear-probe`."""
    def add_classification(name: str, func, help: str, example: str) -> argparse.ArgumentParser:
        p = add(name, func, help, example)
        p.add_argument("--dataset", required=True,
                       help="ImageFolder root (DATASET/SPLIT/<class>/<image>) or CLIP_benchmark "
                            "webdataset root (DATASET/SPLIT/*.tar + DATASET/classnames.txt)")
        p.add_argument("--classnames", help="class names file, one per line in label order "
                                            "(default: DATASET/classnames.txt, or folder names)")
        _add_encoding_options(p, "write the result JSON here (CLIP_benchmark keys)")
        return p

    p = add_classification("zeroshot", _cmd_zeroshot,
                           "zero-shot classification: acc1, acc5, mean per-class recall",
                           "vlp eval zeroshot --checkpoint runs/tiny/checkpoints "
                           "--dataset world/classification/shape/wds")
    p.add_argument("--split", default="test", help="split of DATASET to classify")
    p.add_argument("--templates",
                   help="prompt templates file, one per line with {c} for the class name "
                        "(default: DATASET/zeroshot_classification_templates.txt, else a small "
                        "CLIP set)")

    p = add_classification("linear-probe", _cmd_linear_probe,
                           "logistic regression on frozen image features, L2 chosen on "
                           "validation (CLIP_benchmark's procedure)",
                           "vlp eval linear-probe --checkpoint runs/tiny/checkpoints "
                           "--dataset world/classification/colour/imagefolder")
    p.add_argument("--train-split", default="train", help="split the probe is fitted on")
    p.add_argument("--val-split", default="val",
                   help="validation split; when DATASET has none, --val-proportion of train")
    p.add_argument("--test-split", default="test", help="split the probe is scored on")
    p.add_argument("--val-proportion", type=float, default=0.2,
                   help="share of train held out for validation when there is no val split")
    p.add_argument("--lr", type=float, default=0.1, help="probe learning rate")
    p.add_argument("--epochs", type=int, default=10, help="probe training epochs")
    p.add_argument("--probe-batch-size", type=int, default=64, help="features per probe step")
    p.add_argument("--seed", type=int, default=0, help="probe seed (init, order, val split)")

def _add_compositionality(add) -> None:
    """`vlp eval compositionality`."""
    p = add("compositionality", _cmd_compositionality,
            "edited-caption accuracy per kind of edit (SugarCrepe / ARO): does the true caption "
            "score above a minimally edited one, by ITC and by ITM?",
            "vlp eval compositionality --checkpoint runs/tiny/checkpoints "
            "--edits world/compositionality --image-root world")
    p.add_argument("--edits", required=True,
                   help="SugarCrepe folder of {kind}.json files (or one file), or an ARO JSON "
                        "(VG-Relation / VG-Attribution)")
    p.add_argument("--image-root", required=True, help="folder the items' image names are under")
    p.add_argument("--no-itm", action="store_true",
                   help="score with the dual encoder only (no fused layers needed)")
    _add_encoding_options(p, "write the result JSON here")

def _add_nightly(add) -> None:
    """`vlp eval nightly`."""
    p = add("nightly", _cmd_nightly,
            "evaluate new checkpoints of all runs; results.parquet, TensorBoard, report.html "
            "(exit status 1 when a checkpoint failed in this run, 4 on a regression with "
            "--fail-on-regression)",
            "vlp eval nightly --runs runs --suite eval_suite.yaml", checkpoint=False)
    p.add_argument("--runs", required=True, help="folder of runs (runs/NAME/checkpoints/...)")
    p.add_argument("--suite", help="benchmark suite YAML/JSON (default RUNS/eval_suite.yaml)")
    p.add_argument("--out", help="output folder (default RUNS/nightly); one run at a time holds "
                                 "its nightly.lock")
    p.add_argument("--retry-failed", action="store_true",
                   help="evaluate again what failed before (default: failures are final)")
    p.add_argument("--regression-margin", type=float, default=0.05,
                   help="flag a metric whose latest value is more than this fraction below its "
                        "run's best (default 0.05)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit with status 4 when a metric regressed (for cron or CI)")

def _add_encoding_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """--batch-size, --bf16 and --out of the jobs that encode a dataset and write one JSON."""
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast")
    p.add_argument("--out", type=_output_file, help=out_help)
