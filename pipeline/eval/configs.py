"""The settings of each evaluation job, one typed config per job (job_config.py explains the
machinery): `vlp eval <job>`'s options and a nightly suite entry's keys are these fields.

They live apart from the jobs so that building the `vlp` parser imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.job_config import REQUIRED, JobConfig, setting


@dataclass(frozen=True)
class RetrievalConfig(JobConfig):
    """Settings of `vlp eval retrieval`: the test set is a Karpathy JSON with its image root, or
    retrieval webdataset shards."""

    karpathy_json: Path | None = setting(None, "Karpathy split JSON (with --image-root)")
    image_root: Path | None = setting(None, "folder the JSON's filepath/filename are relative to")
    split: str = setting("test", "Karpathy split to evaluate")
    shards: tuple[str, ...] | None = setting(
        None, "retrieval webdataset tars (image + .txt, one caption per line), instead of "
              "--karpathy-json", location=True)
    rerank_k: int = setting(0, "re-rank each query's top K candidates with the ITM head "
                               "(0 = off)", minimum=0)
    batch_size: int = setting(64, "images per encoder batch", minimum=1)
    chunk: int = setting(1024, "queries per score block", minimum=1)
    bf16: bool = setting(False, "encode under bf16 autocast")

    def check(self) -> None:
        if (self.karpathy_json is None) == (self.shards is None):
            raise UserError("give either --karpathy-json (with --image-root) or --shards")
        if self.karpathy_json is not None and self.image_root is None:
            raise UserError("--karpathy-json needs --image-root (the folder its filepaths are in)")


@dataclass(frozen=True)
class VQAConfig(JobConfig):
    """Settings of `vlp eval vqa`: the data (a VQAv2 folder or explicit files) and the
    fine-tune budget every checkpoint gets."""

    vqa_dir: Path | None = setting(None, "folder with *_{split}_questions.json / "
                                         "_annotations.json")
    train_split: str = setting("train", "split name in --vqa-dir's file names to fine-tune on")
    eval_split: str = setting("val", "split name in --vqa-dir to score")
    train_questions: Path | None = setting(None, "explicit train questions JSON")
    train_annotations: Path | None = setting(None, "explicit train annotations JSON")
    eval_questions: Path | None = setting(None, "explicit eval questions JSON")
    eval_annotations: Path | None = setting(None, "explicit eval annotations JSON")
    image_root: Path | None = setting(None, "images folder (default: the questions file's "
                                            "folder)")
    image_pattern: str | None = setting(
        None, "image path under the root, formatted with the questions file's data_subtype and "
              "the image id, e.g. '{split}/COCO_{split}_{image_id:012d}.jpg' (default: auto)")
    min_answer_count: int = setting(9, "answer vocabulary: normalised training answers given "
                                       "this often", minimum=1)
    steps: int | None = setting(None, "fine-tune for exactly this many steps", minimum=0)
    epochs: float | None = setting(None, "or this many epochs (1 when --steps is not given)")
    lr: float | None = setting(None, "default 1e-3 (head only), 1e-4 (--finetune-backbone)")
    batch_size: int = setting(32, "questions per fine-tune step", minimum=1)
    finetune_backbone: bool = setting(False, "train the whole model, not only the VQA head")
    late_fusion_baseline: bool = setting(
        False, "also fine-tune a late-fusion head (unimodal CLS states, no fused layer) with the "
               "same budget and report it as a baseline")
    bf16: bool = setting(False, "bf16 autocast for training and inference")
    seed: int = setting(0, "fine-tune seed (head init, order)")

    def check(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"epochs must be > 0, got {self.epochs}")


@dataclass(frozen=True)
class CaptionConfig(JobConfig):
    """Settings of `vlp eval caption`: the Karpathy split, the fine-tune budget (0: the
    checkpoint's own LM head) and the decoding."""

    karpathy_json: Path = setting(REQUIRED, "Karpathy split JSON (dataset_coco.json layout) "
                                            "with references")
    image_root: Path = setting(REQUIRED, "folder the JSON's filepath/filename are relative to")
    split: str = setting("test", "split to caption")
    train_splits: tuple[str, ...] = setting(
        ("train", "restval"), "training splits for the fine-tune and the baselines, those "
                              "present", flag="--train-split")
    steps: int = setting(0, "captioning fine-tune steps before decoding (0: the checkpoint "
                            "must have been pretrained with model.lm_weight > 0)", minimum=0)
    lr: float = setting(1e-4, "fine-tune learning rate")
    batch_size: int = setting(32, "pairs per fine-tune step", minimum=1)
    beam_size: int = setting(1, "1 = greedy", minimum=1)
    max_length: int = setting(30, "most tokens per caption", minimum=1)
    length_penalty: float = setting(1.0, "beam score = log-probability / length ** this")
    no_repeat_ngram_size: int = setting(0, "forbid repeating an n-gram of this size (0 = off)",
                                        minimum=0)
    spice: bool = setting(True, "score SPICE (reported unavailable without its models)")
    bf16: bool = setting(False, "bf16 autocast for training and inference")
    seed: int = setting(0, "fine-tune seed (order)")


@dataclass(frozen=True)
class ClassificationData(JobConfig):
    """The dataset settings the zero-shot and linear-probe jobs share."""

    dataset: Path = setting(REQUIRED, "ImageFolder root (DATASET/SPLIT/<class>/<image>) or "
                                      "CLIP_benchmark webdataset root (DATASET/SPLIT/*.tar + "
                                      "DATASET/classnames.txt)")
    classnames: Path | None = setting(None, "class names file, one per line in label order "
                                            "(default: DATASET/classnames.txt, or folder names)")
    batch_size: int = setting(64, "images per encoder batch", minimum=1)
    bf16: bool = setting(False, "encode under bf16 autocast")


@dataclass(frozen=True)
class ZeroShotConfig(ClassificationData):
    """Settings of `vlp eval zeroshot`."""

    split: str = setting("test", "split of DATASET to classify")
    templates: Path | None = setting(
        None, "prompt templates file, one per line with {c} for the class name (default: "
              "DATASET/zeroshot_classification_templates.txt, else a small CLIP set)")


@dataclass(frozen=True)
class LinearProbeConfig(ClassificationData):
    """Settings of `vlp eval linear-probe` (CLIP_benchmark's defaults)."""

    train_split: str = setting("train", "split the probe is fitted on")
    val_split: str = setting("val", "validation split; when DATASET has none, "
                                    "--val-proportion of train")
    test_split: str = setting("test", "split the probe is scored on")
    val_proportion: float = setting(0.2, "share of train held out for validation when there is "
                                         "no val split")
    lr: float = setting(0.1, "probe learning rate")
    epochs: int = setting(10, "probe training epochs", minimum=1)
    probe_batch_size: int = setting(64, "features per probe step", minimum=1)
    seed: int = setting(0, "probe seed (init, order, val split)")

    def check(self) -> None:
        if not 0 < self.val_proportion < 1:
            raise UserError(f"val_proportion must be in (0, 1), got {self.val_proportion}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class CompositionalityConfig(JobConfig):
    """Settings of `vlp eval compositionality`."""

    edits: Path = setting(REQUIRED, "SugarCrepe folder of {kind}.json files (or one file), or an "
                                    "ARO JSON (VG-Relation / VG-Attribution)")
    image_root: Path = setting(REQUIRED, "folder the items' image names are under")
    itm: bool = setting(True, "also score with the fusion encoder's ITM head (--no-itm: the "
                              "dual encoder only, e.g. for an export without fused layers)")
    batch_size: int = setting(64, "images per encoder batch", minimum=1)
    bf16: bool = setting(False, "encode under bf16 autocast")
