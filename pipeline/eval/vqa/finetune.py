"""VQA as classification: answer vocabulary, soft targets, a fixed-budget fine-tune, predictions.

The vocabulary holds the normalised training answers given at least `min_count` times (VQAv2's
usual 3,129 answers are those given more than 8 times). A question's target for each vocabulary
answer is the official accuracy that answer would score (`answer_soft_scores`). Fine-tuning
trains the VQA head (or the whole model) with AdamW at a constant learning rate for a fixed number
of steps, so every checkpoint gets the same budget and the results compare.
"""
from __future__ import annotations

import functools
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.tokenizer import tokenize
from vlp.pipeline.eval.encode import autocast, model_device
from vlp.pipeline.eval.images import load_images
from vlp.pipeline.eval.vqa.data import VQAExample
from vlp.pipeline.eval.vqa.metric import answer_soft_scores, normalize_answer


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


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int | None = None  # fixed step budget; else `epochs` passes over the training set
    epochs: float = 1.0
    lr: float | None = None  # default 1e-3 for the head alone, 1e-4 with the backbone
    batch_size: int = 32
    weight_decay: float = 0.01
    finetune_backbone: bool = False
    bf16: bool = False
    seed: int = 0
    fusion: str = "fused"  # "late": the head reads the unimodal CLS states (the baseline)

    def num_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(num_examples / self.batch_size)))

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.finetune_backbone else 1e-3


class _Batches:
    """(images, question ids, mask) batches of VQA examples, decoded with a thread pool."""

    def __init__(self, tokenizer, max_len: int, image_size: int, device: torch.device):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.image_size, self.device = image_size, device
        self.pool = ThreadPoolExecutor(max_workers=4)

    def __call__(self, examples: list[VQAExample]):
        images = load_images([e.image for e in examples], self.image_size, self.pool)
        ids, mask = tokenize(self.tokenizer, [e.question for e in examples], self.max_len)
        return images.to(self.device), ids.to(self.device), mask.to(self.device)

    def close(self) -> None:
        self.pool.shutdown()


def finetune_vqa(model, tokenizer, examples: list[VQAExample], vocab: AnswerVocab,
                 cfg: FinetuneConfig) -> dict:
    """Attach a fresh VQA head to `model` (in place), its output bias at the training answers'
    prior, and train it; returns training stats.

    Questions with no vocabulary answer are left out (their target would be all zeros).
    """
    from vlp.models.model import LossWeights

    targets = [vocab.targets(e) for e in examples]
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        raise UserError("no training question has an answer in the vocabulary")
    generator = torch.Generator().manual_seed(cfg.seed)
    prior = vocab.prior([targets[i] for i in keep])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model.attach_vqa_head(len(vocab.answers), answer_prior=prior, fusion=cfg.fusion)
    model.loss_weights = LossWeights(itc=0, itm=0, mlm=0, vqa=1)
    for name, param in model.named_parameters():
        param.requires_grad_(cfg.finetune_backbone or name.startswith("vqa_head."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    device = model_device(model)
    batches = _Batches(tokenizer, model.config.max_text_len, model.config.image_size, device)
    num_steps, order, losses = cfg.num_steps(len(keep)), [], []
    start = time.perf_counter()
    model.train()
    try:
        for _ in range(num_steps):
            if len(order) < cfg.batch_size:  # next epoch: a fresh permutation
                order += [keep[i] for i in torch.randperm(len(keep), generator=generator)]
            batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
            images, ids, mask = batches([examples[i] for i in batch])
            target = vocab.dense_targets([targets[i] for i in batch]).to(device)
            with autocast(device, cfg.bf16):
                loss = model(images, ids, mask, vqa_targets=target)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        batches.close()
        model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": num_steps,
        "train_questions": len(keep),
        "lr": cfg.learning_rate(),
        "batch_size": cfg.batch_size,
        "finetune_backbone": cfg.finetune_backbone,
        "fusion": cfg.fusion,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 3),
    }


@torch.inference_mode()
def predict_vqa(model, tokenizer, examples: list[VQAExample], vocab: AnswerVocab,
                batch_size: int = 64, bf16: bool = False) -> dict[int, str]:
    """question_id -> highest-scoring vocabulary answer."""
    device = model_device(model)
    batches = _Batches(tokenizer, model.config.max_text_len, model.config.image_size, device)
    predictions = {}
    try:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            with autocast(device, bf16):
                logits = model.vqa_logits(*batches(chunk))
            for example, index in zip(chunk, logits.argmax(dim=1).tolist()):
                predictions[example.question_id] = vocab.answers[index]
    finally:
        batches.close()
    return predictions
