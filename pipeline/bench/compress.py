"""`vlp bench compress`: size, encode speed and accuracy of compressed exports beside fp32.

From one checkpoint (any path `load_model` takes) the benchmark builds, in a work directory,
    fp32     the plain export (the reference every delta is against)
    int8     `vlp deploy quantize` (dynamic int8 encoders, weight-only int8 fusion FFN)
    pruned   `vlp deploy prune --sparsity S` without recovery (the recovery is a training run:
             pass its export with --recovered)
    onnx     `vlp deploy onnx` (the two encoders on ONNX Runtime)
and adds the exports it is given: --recovered (pruned + recovery fine-tune), --student and
--student-baseline (a distilled student and the same student trained without the teacher),
--variant NAME=PATH (anything else). For each it measures, in this one process:
- file size: every file of the export directory;
- encode throughput: images/s and captions/s at batch 1 (a loop of single items) and batched,
  over the test set's own first images and captions; all variants run interleaved, round after
  round, and each figure is the median round (vlp.pipeline.bench.common);
- retrieval: `evaluate_retrieval` on the test set (R@1 both ways) and, with --vqa-dir, VQA
  accuracy from `evaluate_vqa` with the quickstart's fine-tune budget; each as a delta to fp32.
ONNX exports have no fusion layers, so no VQA. The compression targets are checked when their rows
exist: int8 within 1 point of fp32 text->image R@1 at >= 1.5x its batched encode throughput;
pruned + recovered within 3 points; the distilled student above its baseline; ONNX Runtime at
least as fast as torch eager (batched, both encoders).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vlp.pipeline.bench.common import (
    environment,
    format_table,
    interleaved_timings,
    median,
    out_path,
    repeats_for,
    verdict,
    write_json,
)

SPEED_KEYS = ("image_b1", "image_batched", "text_b1", "text_batched")


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="the fp32 model: export, tag or run dir")
    p.add_argument("--karpathy-json", required=True, help="retrieval test set (Karpathy JSON)")
    p.add_argument("--image-root", required=True, help="folder of the test set's images")
    p.add_argument("--split", default="test", help="Karpathy split to evaluate")
    p.add_argument("--vqa-dir", help="VQAv2-format folder; adds VQA accuracy (slow: a fine-tune "
                                     "per variant)")
    p.add_argument("--vqa-steps", type=int, default=150, help="VQA fine-tune steps (quickstart's)")
    p.add_argument("--sparsity", type=float, default=0.5, help="the built-in pruned variant's")
    p.add_argument("--recovered", help="export of the pruned model after its recovery fine-tune")
    p.add_argument("--student", help="export of a distilled student")
    p.add_argument("--student-baseline", help="the same student trained without the teacher")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="another export to measure (repeatable)")
    p.add_argument("--batch-size", type=int, default=64, help="the batched throughput's batch")
    p.add_argument("--single-items", type=int, default=16,
                   help="items encoded one at a time per batch-1 timing")
    p.add_argument("--work-dir", help="where the built exports go (default beside --out)")


def build_variants(args, work: Path) -> dict[str, Path]:
    """{name: export directory}: the built-in exports of args.checkpoint, then the given ones."""
    from vlp.pipeline.deploy.export import export_checkpoint
    from vlp.pipeline.deploy.onnx import export_onnx
    from vlp.pipeline.deploy.prune import prune_checkpoint
    from vlp.pipeline.deploy.quantize import quantize_checkpoint

    fp32 = export_checkpoint(args.checkpoint, work / "fp32")
    variants = {"fp32": fp32}
    variants["int8"] = quantize_checkpoint(fp32, work / "int8")
    prune_checkpoint(fp32, work / "pruned", args.sparsity)
    variants[f"pruned{round(100 * args.sparsity)}"] = work / "pruned"
    export_onnx(fp32, work / "onnx")
    variants["onnx"] = work / "onnx"
    given = {"pruned+recovered": args.recovered, "student (distilled)": args.student,
             "student (no teacher)": args.student_baseline}
    for item in args.variant:
        name, _, path = item.partition("=")
        given[name] = path
    variants.update({name: Path(path) for name, path in given.items() if path})
    return variants


def directory_bytes(path: Path) -> int:
    from vlp.pipeline.data.model_loading import resolve_checkpoint

    _, directory = resolve_checkpoint(path)
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def speed_calls(model, images, ids, mask, singles: int) -> dict[str, Callable[[], None]]:
    """The four timed calls of one model (batch 1: `singles` items one after another)."""
    import torch

    def loop(encode, *tensors):
        def run():
            with torch.inference_mode():
                for i in range(singles):
                    encode(*(t[i:i + 1] for t in tensors))
        return run

    def batched(encode, *tensors):
        def run():
            with torch.inference_mode():
                encode(*tensors)
        return run

    return {"image_b1": loop(model.encode_image, images),
            "image_batched": batched(model.encode_image, images),
            "text_b1": loop(model.encode_text, ids, mask),
            "text_batched": batched(model.encode_text, ids, mask)}


def measure_speed(models: dict, images, ids, mask, singles: int, repeats: int) -> dict:
    """{variant: {key: items/s}}, all calls of all variants interleaved in each round."""
    calls = {(name, key): fn for name, model in models.items()
             for key, fn in speed_calls(model, images, ids, mask, singles).items()}
    timings = interleaved_timings({f"{n}|{k}": fn for (n, k), fn in calls.items()}, repeats)
    items = {"image_b1": singles, "text_b1": singles,
             "image_batched": len(images), "text_batched": len(ids)}
    return {name: {key: items[key] / median(timings[f"{name}|{key}"]["wall_s"])
                   for key in SPEED_KEYS} for name in models}


def accuracy(loaded, args) -> dict:
    """Text->image and image->text R@1 (percent) and, with --vqa-dir, VQA accuracy."""
    from vlp.pipeline.eval.configs import RetrievalConfig, VQAConfig
    from vlp.pipeline.eval.retrieval.job import evaluate_retrieval
    from vlp.pipeline.eval.vqa.job import evaluate_vqa

    retrieval = RetrievalConfig(karpathy_json=args.karpathy_json, image_root=args.image_root,
                                split=args.split)
    metrics = evaluate_retrieval(loaded, retrieval)["metrics"]
    result = {"t2i_r1": 100 * metrics["image_retrieval_recall@1"],
              "i2t_r1": 100 * metrics["text_retrieval_recall@1"], "vqa": None}
    if args.vqa_dir and loaded.info.kind != "onnx":
        vqa = evaluate_vqa(loaded, VQAConfig(vqa_dir=args.vqa_dir, steps=args.vqa_steps,
                                             finetune_backbone=True, lr=3e-4, min_answer_count=3,
                                             seed=0))
        result["vqa"] = vqa["metrics"]["overall"]
    return result


def targets(rows: dict[str, dict]) -> dict:
    """The compression targets for whichever rows this run has."""
    def delta(name, key="t2i_r1"):
        return rows[name][key] - rows["fp32"][key]

    def speedup(name, keys=("image_batched", "text_batched"), over="fp32"):
        return min(rows[name]["speed"][k] / rows[over]["speed"][k] for k in keys)

    checks = {"int8_t2i_r1_delta": verdict(delta("int8"), -1.0),
              "int8_batched_speedup": verdict(speedup("int8"), 1.5),
              "onnx_vs_torch_batched_speedup": verdict(speedup("onnx"), 1.0)}
    if "pruned+recovered" in rows:
        checks["pruned_recovered_t2i_r1_delta"] = verdict(delta("pruned+recovered"), -3.0)
    if "student (distilled)" in rows and "student (no teacher)" in rows:
        gain = rows["student (distilled)"]["t2i_r1"] - rows["student (no teacher)"]["t2i_r1"]
        checks["student_t2i_r1_gain_from_teacher"] = verdict(gain, 0.0)
    return checks


def table(rows: dict[str, dict], batch: int) -> str:
    headers = ["variant", "MiB", "img/s b1", f"img/s b{batch}", "cap/s b1", f"cap/s b{batch}",
               "t2i R@1", "d", "i2t R@1", "d", "VQA", "d"]
    ref = rows["fp32"]

    def d(row, key):
        return None if row[key] is None or ref[key] is None else row[key] - ref[key]

    body = [[name, row["bytes"] / 2**20, *(row["speed"][k] for k in SPEED_KEYS),
             row["t2i_r1"], d(row, "t2i_r1"), row["i2t_r1"], d(row, "i2t_r1"),
             row["vqa"], d(row, "vqa")] for name, row in rows.items()]
    return format_table(headers, body, title="compressed exports vs fp32 (d = minus fp32)")


def run(args) -> int:
    import torch

    from vlp.pipeline.data.model_loading import load_model
    from vlp.pipeline.data.tokenizer import tokenize
    from vlp.pipeline.eval.images import load_images
    from vlp.pipeline.eval.retrieval.data import load_karpathy

    path = out_path(args, "compress")
    repeats = repeats_for(args, full=7, quick=1)
    if args.quick:
        args.batch_size, args.single_items, args.vqa_steps = 8, 2, 2
    work = Path(args.work_dir) if args.work_dir else path.with_name("compress_exports")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    variants = build_variants(args, work)
    loaded = {name: load_model(directory) for name, directory in variants.items()}

    config = loaded["fp32"].model.config
    dataset = load_karpathy(args.karpathy_json, args.image_root, args.split)
    images = load_images(dataset.images[:args.batch_size], config.image_size)
    ids, mask = tokenize(loaded["fp32"].tokenizer, dataset.captions[:args.batch_size],
                         config.max_text_len)
    speeds = measure_speed({n: lm.model for n, lm in loaded.items()}, images, ids, mask,
                           min(args.single_items, len(images)), repeats)
    rows = {name: {"path": str(variants[name]), "bytes": directory_bytes(variants[name]),
                   "speed": speeds[name], **accuracy(loaded[name], args)} for name in loaded}
    print(table(rows, len(images)))
    checks = targets(rows)
    for name, check in checks.items():
        print(f"{name}: {check['value']:.3f} (goal {check['direction']} {check['goal']}): "
              f"{'met' if check['met'] else 'NOT met'}")
    write_json(path, {"benchmark": "compress", "environment": environment(),
                      "torch_threads": torch.get_num_threads(), "repeats": repeats,
                      "batch_size": len(images), "single_items": args.single_items,
                      "rows": rows, "targets": checks,
                      "seconds": time.perf_counter() - started})
    print(f"wrote {path}")
    return 0
