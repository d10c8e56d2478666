"""The evaluation jobs, registered once: the `vlp eval` commands (cli.py) and the nightly
suite's tasks (nightly/suite.py) are both built from JOBS. Light to import: a job's module is
imported only when it runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from vlp.pipeline.eval.configs import (
    CaptionConfig,
    CompositionalityConfig,
    LinearProbeConfig,
    RetrievalConfig,
    VQAConfig,
    ZeroShotConfig,
)
from vlp.pipeline.eval.job_config import JobConfig


@dataclass(frozen=True)
class EvalJob:
    """An evaluation job over one checkpoint: its `vlp eval` command name, its nightly suite
    task name, its typed config (configs.py), the function that runs it (imported when it
    runs), and its help."""

    name: str
    task: str
    config: type[JobConfig]
    function: str  # "module:function", called as function(checkpoint, config, out=, device=)
    help: str
    example: str
    results_file: str | None = None  # the official results file it also writes (--results)
    distributed: bool = False  # encoding splits across ranks under torchrun/deepspeed

    def evaluate(self) -> Callable[..., dict]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


JOBS = (
    EvalJob("retrieval", "retrieval", RetrievalConfig, "vlp.pipeline.eval.retrieval.job:evaluate_retrieval",
            "zero-shot image<->text retrieval recall@1/5/10",
            "vlp eval retrieval --checkpoint runs/tiny/checkpoints "
            "--karpathy-json world/retrieval/dataset_synth.json --image-root world/retrieval",
            distributed=True),
    EvalJob("vqa", "vqa", VQAConfig, "vlp.pipeline.eval.vqa.job:evaluate_vqa",
            "VQAv2: fine-tune the VQA head, official accuracy on the eval split",
            "vlp eval vqa --checkpoint runs/tiny/checkpoints --vqa-dir world/vqa --steps 400",
            results_file="official results file [{question_id, answer}]"),
    EvalJob("caption", "caption", CaptionConfig, "vlp.pipeline.eval.caption.job:evaluate_caption",
            "image captioning on a Karpathy split: COCO caption metrics (BLEU, METEOR, ROUGE-L, "
            "CIDEr, SPICE when installed) with baselines, optionally after a fine-tune",
            "vlp eval caption --checkpoint runs/tiny/checkpoints "
            "--karpathy-json world/dataset_synth.json --image-root world --steps 150",
            results_file="COCO results file [{image_id, caption}]"),
    EvalJob("zeroshot", "zeroshot", ZeroShotConfig, "vlp.pipeline.eval.classification.zeroshot:"
            "evaluate_zeroshot", "zero-shot classification: acc1, acc5, mean per-class recall",
            "vlp eval zeroshot --checkpoint runs/tiny/checkpoints "
            "--dataset world/classification/shape/wds"),
    EvalJob("linear-probe", "linear_probe", LinearProbeConfig, "vlp.pipeline.eval.classification.probe:"
            "evaluate_linear_probe",
            "logistic regression on frozen image features, L2 chosen on validation "
            "(CLIP_benchmark's procedure)",
            "vlp eval linear-probe --checkpoint runs/tiny/checkpoints "
            "--dataset world/classification/colour/imagefolder"),
    EvalJob("compositionality", "compositionality", CompositionalityConfig,
            "vlp.pipeline.eval.compositionality.job:evaluate_compositionality",
            "edited-caption accuracy per kind of edit (SugarCrepe / ARO): does the true caption "
            "score above a minimally edited one, by ITC and by ITM?",
            "vlp eval compositionality --checkpoint runs/tiny/checkpoints "
            "--edits world/compositionality --image-root world"),
)
