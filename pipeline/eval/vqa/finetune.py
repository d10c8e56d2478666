"""VQA as classification: answer vocabulary, soft targets, a fixed-budget fine-tune, predictions.

The vocabulary holds the normalised training answers given at least `min_count` times (VQAv2's
usual 3,129 answers are those given more than 8 times). A question's target for each vocabulary
answer is the official accuracy that answer would score (`answer_soft_scores`). Fine-tuning
trains the VQA head (or the whole model) with the shared fixed-budget loop
(`vlp.pipeline.eval.finetune`), so every checkpoint gets the same budget and the results compare.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.encode import autocast, model_device
from vlp.pipeline.eval.finetune import FinetuneConfig, ImageTextBatches, finetune
from vlp.pipeline.eval.vqa.data import VQAExample
from vlp.pipeline.eval.vqa.metric import answer_soft_scores, normalize_answer
from vlp.pipeline.progress import ProgressLine


@dataclass(frozen=True)
class AnswerVocab:
    answers: tuple[str, ...]  # most frequent first

    @classmethod
    def build(cls, examples: list[VQAExample], min_count: int) -> AnswerVocab:
        counts = Counter(normalize_answer(a) for e in examples for a in e.answers)
        answers = tuple(a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                        if n >= min_count)
        if not answers:
            raise UserError(
                f"no training answer is given at least {min_count} times "
                f"(most common: {counts.most_common(1)}); lower min_answer_count"
            )
        return cls(answers)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}

    def targets(self, example: VQAExample) -> dict[int, float]:
        """Sparse soft scores of one question: vocabulary index -> score."""
        scores = answer_soft_scores(list(example.answers))
        return {self.index[a]: s for a, s in scores.items() if a in self.index}

    def prior(self, sparse: list[dict[int, float]]) -> torch.Tensor:
        """(V,) mean soft score of each answer over these questions, without a dense matrix."""
        total = torch.zeros(len(self.answers), dtype=torch.float64)
        for scores in sparse:
            for index, score in scores.items():
                total[index] += score
        return (total / max(1, len(sparse))).float()

    def dense_targets(self, sparse: list[dict[int, float]]) -> torch.Tensor:
        """(B, V) target matrix from a batch of sparse targets."""
        target = torch.zeros(len(sparse), len(self.answers))
        for row, scores in enumerate(sparse):
            for index, score in scores.items():
                target[row, index] = score
        return target


def finetune_vqa(model, tokenizer, examples: list[VQAExample], vocab: AnswerVocab,
                 cfg: FinetuneConfig, fusion: str = "fused") -> dict:
    """Attach a fresh VQA head to `model` (in place), its output bias at the training answers'
    prior, and train it (with the backbone when cfg.finetune_backbone); returns training stats.
    fusion="late": the head reads the unimodal CLS states, the baseline without fused layers.

    Questions with no vocabulary answer are left out (their target would be all zeros).
    """
    from vlp.models.model import LossWeights

    targets = [vocab.targets(e) for e in examples]
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        raise UserError("no training question has an answer in the vocabulary")
    prior = vocab.prior([targets[i] for i in keep])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model.attach_vqa_head(len(vocab.answers), answer_prior=prior, fusion=fusion)
    model.loss_weights = LossWeights(itc=0, itm=0, mlm=0, vqa=1)
    device = model_device(model)

    def batch_loss(batch: list[int]) -> torch.Tensor:
        images, ids, mask, _ = batches([examples[i].image for i in batch],
                                       [examples[i].question for i in batch])
        target = vocab.dense_targets([targets[i] for i in batch]).to(device)
        return model(images, ids, mask, vqa_targets=target)["loss"]

    with ImageTextBatches(tokenizer, model.config.max_text_len, model.config.image_size,
                          device) as batches:
        stats = finetune(model, keep, cfg, batch_loss, trainable=lambda name: (
            cfg.finetune_backbone or name.startswith("vqa_head.")),
            label="vqa fine-tune" if fusion == "fused" else f"vqa fine-tune ({fusion} fusion)")
    return {"steps": stats.pop("steps"), "train_questions": len(keep), **stats,
            "finetune_backbone": cfg.finetune_backbone, "fusion": fusion}


@torch.inference_mode()
def predict_vqa(model, tokenizer, examples: list[VQAExample], vocab: AnswerVocab,
                batch_size: int = 64, bf16: bool = False) -> dict[int, str]:
    """question_id -> highest-scoring vocabulary answer."""
    device = model_device(model)
    predictions = {}
    with (ImageTextBatches(tokenizer, model.config.max_text_len, model.config.image_size,
                           device) as batches,
          ProgressLine("vqa prediction", len(examples), "question") as progress):
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            images, ids, mask, _ = batches([e.image for e in chunk], [e.question for e in chunk])
            with autocast(device, bf16):
                logits = model.vqa_logits(images, ids, mask)
            for example, index in zip(chunk, logits.argmax(dim=1).tolist()):
                predictions[example.question_id] = vocab.answers[index]
            progress.update(len(chunk))
    return predictions
