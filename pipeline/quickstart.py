"""`vlp quickstart`: the whole pipeline on the synthetic world, end to end, on this machine.

    render world -> serve on loopback -> img2dataset shards -> index -> tokenizer
    -> pretrain `tiny` with DeepSpeed ZeRO-3 on N ranks (real deepspeed launcher)
    -> nightly evaluation of the trained checkpoint (retrieval, edited-caption compositionality,
       VQA, captioning, zero-shot classification and linear probe)
    -> a summary table with the baselines (chance, majority answer, late fusion, retrieved and
       most frequent training caption), the report and TensorBoard paths.

The untrained checkpoint is not evaluated: every headline metric has a baseline that reads
better (chance, the majority answer, late fusion, the retrieved caption).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import yaml

from vlp.data_prep.compositionality import EDIT_KINDS
from vlp.pipeline.data.errors import StageFailed
from vlp.pipeline.data.files import write_json_atomic, write_text_atomic

RECIPE = "tiny_synth.yaml"  # shipped with the package (vlp/pipeline/recipes)
RUN_NAME = "tiny_synth"


@dataclass
class QuickstartConfig:
    out_dir: str = "quickstart_out"
    n_train: int = 12000
    n_test: int = 1000
    n_vqa_train: int = 3000
    n_vqa_val: int = 500
    seed: int = 0
    nproc: int | None = None
    max_steps: int = 1080  # the recipe's length; tests/test_train_config.py keeps the two equal
    vocab_size: int = 256
    samples_per_shard: int = 1000
    vqa_steps: int = 150  # the whole model is fine-tuned: a head alone barely learns here
    rerank_k: int = 16
    caption_steps: int = 300  # the recipe pretrains without the LM objective: docs/fusion.md


# The help of each `vlp quickstart --flag` (one per QuickstartConfig field).
FIELD_HELP = {
    "out_dir": "everything goes here: world, data, runs, quickstart_summary.json",
    "n_train": "training images (one caption row each in the URL list)",
    "n_test": "retrieval test images, 5 captions each",
    "n_vqa_train": "VQA training images, 4 questions each",
    "n_vqa_val": "VQA evaluation images, 4 questions each",
    "seed": "world, training and fine-tune seed",
    "nproc": "training ranks (default: every visible GPU, else 2 CPU ranks)",
    "max_steps": "pretraining steps",
    "vocab_size": "WordPiece vocabulary size",
    "samples_per_shard": "samples per downloaded shard",
    "vqa_steps": "VQA fine-tune steps per evaluated checkpoint",
    "rerank_k": "retrieval candidates the ITM head re-ranks per query, both directions",
    "caption_steps": "captioning fine-tune steps per evaluated checkpoint",
}


def _eval_suite(world: dict, cfg: QuickstartConfig) -> dict:
    return {
        "synth_retrieval": {"task": "retrieval", "karpathy_json": str(world["retrieval_json"]),
                            "image_root": str(world["retrieval_image_root"]), "split": "test",
                            "rerank_k": cfg.rerank_k},
        "synth_vqa": {"task": "vqa", "vqa_dir": str(world["world"] / "vqa"), "steps": cfg.vqa_steps,
                      "finetune_backbone": True, "lr": 3e-4, "min_answer_count": 3,
                      "bf16": True, "seed": cfg.seed,  # bf16 where it is fast: half the time
                      "late_fusion_baseline": True},
        "synth_caption": {"task": "caption", "karpathy_json": str(world["caption_json"]),
                          "image_root": str(world["caption_image_root"]),
                          "steps": cfg.caption_steps, "lr": 5e-4, "batch_size": 32,
                          "beam_size": 3, "bf16": True, "seed": cfg.seed},
        "synth_compositionality": {"task": "compositionality",
                                   "edits": str(world["compositionality_dir"]),
                                   "image_root": str(world["world"]), "bf16": True},
        **{f"synth_{task}_zeroshot": {"task": "zeroshot",
                                      "dataset": str(world[f"classification_{task}_wds"])}
           for task in ("shape", "colour")},
        **{f"synth_{task}_probe": {"task": "linear_probe",
                                   "dataset": str(world[f"classification_{task}_imagefolder"])}
           for task in ("shape", "colour")},
    }


CAPTION_BASELINES = {"retrieval": "retrieved train caption",
                     "most_frequent": "most frequent train caption"}


def summary_table(results: pd.DataFrame, caption_baselines: dict | None = None) -> pd.DataFrame:
    """The trained checkpoint's headline metrics, each with its baseline beside it.

    `caption_baselines`: the trained checkpoint's caption result "baselines" (both of them; the
    results table holds only the primary one), shown as a row each under caption CIDEr.
    """
    ok = results[results["status"] == "ok"]
    headline = {
        ("synth_retrieval", "image_retrieval_recall@1"): "text->image R@1 (ITC)",
        ("synth_retrieval", "reranked_image_retrieval_recall@1"): "text->image R@1 (ITM re-rank)",
        ("synth_retrieval", "image_retrieval_recall@10"): "text->image R@10 (ITC)",
        ("synth_retrieval", "text_retrieval_recall@1"): "image->text R@1 (ITC)",
        ("synth_retrieval", "reranked_text_retrieval_recall@1"): "image->text R@1 (ITM re-rank)",
        ("synth_retrieval", "text_retrieval_recall@10"): "image->text R@10 (ITC)",
        **{("synth_compositionality", f"{kind}/{scorer}"): f"edited caption: {kind} ({upper})"
           for kind in EDIT_KINDS for scorer, upper in (("itm", "ITM"), ("itc", "ITC"))},
        ("synth_vqa", "overall"): "VQA accuracy (fused)",
        ("synth_vqa", "late_fusion/overall"): "VQA accuracy (late fusion)",
        ("synth_vqa", "yes/no"): "VQA yes/no (fused)",
        ("synth_vqa", "number"): "VQA number (fused)",
        ("synth_vqa", "other"): "VQA other (fused)",
        **{("synth_vqa", f"question_type/{kind}"): f"VQA '{kind} ...' (fused)"
           for kind in ("is there a", "how many", "what color is the", "what shape is",
                        "where is the")},
        ("synth_caption", "CIDEr"): "caption CIDEr",
        ("synth_caption", "Bleu_4"): "caption BLEU-4",
        ("synth_caption", "METEOR"): "caption METEOR",
        ("synth_caption", "ROUGE_L"): "caption ROUGE-L",
        ("synth_shape_zeroshot", "acc1"): "shape zero-shot top-1",
        ("synth_colour_zeroshot", "acc1"): "colour zero-shot top-1",
        ("synth_shape_probe", "acc1"): "shape linear probe top-1",
        ("synth_colour_probe", "acc1"): "colour linear probe top-1",
    }
    rows = []
    last_step = ok["step"].max()
    for (benchmark, metric), label in headline.items():
        match = ok[(ok["benchmark"] == benchmark) & (ok["metric"] == metric)]
        if match.empty:
            continue
        percent = 1.0 if benchmark == "synth_vqa" else 100.0  # recalls, captions: fractions
        trained = percent * match[match["step"] == last_step]["value"].iloc[-1]
        baselines = {match["baseline_name"].iloc[-1]: match["baseline"].iloc[-1]}
        if benchmark == "synth_caption" and metric == "CIDEr" and caption_baselines:
            baselines = {name: values[metric] for name, values in caption_baselines.items()}
        for name, value in baselines.items():
            rows.append({"metric (%)": label, "baseline": percent * value,
                         "baseline is": CAPTION_BASELINES.get(name, name),
                         f"trained (step {last_step})": trained})
    return pd.DataFrame(rows)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from vlp.data_prep.prepare import prepare_synthetic_data
    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.data.manifest import shard_url_pattern
    from vlp.pipeline.eval.nightly.runner import read_results, run_nightly
    from vlp.pipeline.train.config import load_train_config, recipe_path
    from vlp.pipeline.train.launch import run_training

    out = Path(cfg.out_dir).resolve()
    runs = out / "runs"
    run_dir = runs / RUN_NAME
    if (run_dir / "checkpoints").exists():
        raise UserError(f"{run_dir} already has checkpoints; remove {out} to start over")
    timings = {}
    start = time.perf_counter()

    data = prepare_synthetic_data(out / "data", cfg.n_train, cfg.n_test, seed=cfg.seed,
                                  image_size=64, vocab_size=cfg.vocab_size,
                                  number_sample_per_shard=cfg.samples_per_shard,
                                  n_vqa_train=cfg.n_vqa_train, n_vqa_val=cfg.n_vqa_val)
    timings["data"] = time.perf_counter() - start

    # A run cut shorter than the recipe's warmup warms up over all of it (a longer one is refused).
    warmup = min(cfg.max_steps, load_train_config(recipe_path(RECIPE)).optim.warmup_steps)
    overrides = [f"run_dir={run_dir}", f"data.shards={shard_url_pattern(data['shards'])}",
                 f"data.tokenizer={data['tokenizer']}", f"optim.max_steps={cfg.max_steps}",
                 f"optim.warmup_steps={warmup}",
                 f"data.lexicon={data['lexicon']}", f"seed={cfg.seed}",
                 "checkpoint.keep_last=0", f"checkpoint.every_steps={cfg.max_steps}"]
    mark = time.perf_counter()
    code = run_training(str(recipe_path(RECIPE)), overrides, nproc=cfg.nproc)
    if code != 0:
        raise StageFailed(f"training failed with exit code {code}; see the output above")
    timings["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    write_text_atomic(runs / "eval_suite.yaml", yaml.safe_dump(_eval_suite(data, cfg)))
    nightly = run_nightly(runs)
    if nightly["failures"]:
        raise StageFailed(f"evaluation failed: {nightly['failures']}")
    timings["eval"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    results = read_results(nightly["results"])
    table = summary_table(results, _caption_baselines(run_dir, results))
    summary = {"config": asdict(cfg), "timings_s": timings, "results": table.to_dict("records"),
               "report": str(runs / "nightly" / "report.html"),
               "tensorboard": f"tensorboard --logdir {runs}"}
    write_json_atomic(out / "quickstart_summary.json", summary)
    return summary


def _caption_baselines(run_dir: Path, results: pd.DataFrame) -> dict | None:
    """Both caption baselines of the last checkpoint, from its caption result JSON."""
    caption = results[(results["benchmark"] == "synth_caption") & (results["status"] == "ok")]
    if caption.empty:
        return None
    tag = f"global_step{int(caption['step'].max())}"
    path = run_dir / "eval" / tag / "synth_caption.json"
    return json.loads(path.read_text())["baselines"] if path.is_file() else None


def _print_summary(summary: dict) -> None:
    table = pd.DataFrame(summary["results"])
    print("\n=== vlp quickstart: held-out synthetic test sets ===")
    print(table.to_string(index=False, float_format=lambda v: f"{v:6.2f}"))
    t = summary["timings_s"]
    print(f"\ntime: data {t['data']:.0f}s, train {t['train']:.0f}s, eval {t['eval']:.0f}s, "
          f"total {t['total'] / 60:.1f} min")
    print(f"report:      {summary['report']}")
    print(f"TensorBoard: {summary['tensorboard']}")


def _cmd_quickstart(args) -> int:
    cfg = QuickstartConfig(**{k: v for k, v in vars(args).items()
                              if k in QuickstartConfig.__dataclass_fields__ and v is not None})
    _print_summary(run_quickstart(cfg))
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "quickstart", "synthetic world -> shards -> pretrain -> eval",
                    ["vlp quickstart",
                     "vlp quickstart --out-dir qs --n-train 2000 --n-test 200 --max-steps 100"])
    for name, value in asdict(QuickstartConfig()).items():
        kind = int if name == "nproc" else type(value)  # the one optional field
        shown = "" if value is None else f" (default: {value})"
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=FIELD_HELP[name] + shown)
    p.set_defaults(func=_cmd_quickstart)
