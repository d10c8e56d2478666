"""VQA evaluation of a checkpoint: fine-tune on the training split, score the eval split.

Steps: load both splits (all files checked first), build the answer vocabulary, fine-tune a copy
of the model (the loaded one is untouched, so a caller can reuse it), predict, score with the
official accuracy overall, per answer type and per question type, and write the official results
file `[{"question_id": ..., "answer": ...}]`. Baselines beside the result: always answering the most
common training answer (`majority`, the primary baseline), the most common one per answer type
(`type_prior`). With `late_fusion_baseline` the job also runs the same fine-tune with the answer
head on the unimodal CLS states of image and question instead of the fused pass, and reports it
beside the fused result as "late_fusion/<metric>": what fusion buys.
"""
from __future__ import annotations

import copy
import time
from collections import Counter, defaultdict
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel, load_model, require_full_model
from vlp.pipeline.eval.configs import VQAConfig
from vlp.pipeline.eval.finetune import FinetuneConfig
from vlp.pipeline.eval.results import write_result
from vlp.pipeline.eval.vqa.data import VQAExample, find_split_files, load_vqa_split
from vlp.pipeline.eval.vqa.finetune import AnswerVocab, finetune_vqa, predict_vqa
from vlp.pipeline.eval.vqa.metric import normalize_answer, score_predictions


def evaluate_vqa(checkpoint: str | Path | LoadedModel, config: VQAConfig, *,
                 out: str | Path | None = None, results_out: str | Path | None = None,
                 device: str = "cpu") -> dict:
    """Official VQA accuracy (percent) after a fixed-budget fine-tune, with baselines.

    Files come from `vqa_dir` (found by split name, images under it) or explicit paths, which
    override. `out` gets the metrics JSON and `results_out` (default: beside `out`,
    `<out stem>.results.json`) the predictions in the official results format. The data is
    read and checked before a checkpoint path is loaded (onto `device`).
    """
    files = _split_files(config)
    root, pattern = config.image_root, config.image_pattern
    train = load_vqa_split(*files["train"], root or files["train"][0].parent, pattern)
    evaluation = load_vqa_split(*files["eval"], root or files["eval"][0].parent, pattern)
    vocab = AnswerVocab.build(train, config.min_answer_count)
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    require_full_model(loaded, "VQA (a fine-tuned head on the fused encoder)")

    start = time.perf_counter()
    cfg = FinetuneConfig(steps=config.steps, epochs=config.epochs or 1.0, lr=config.lr,
                         batch_size=config.batch_size, finetune_backbone=config.finetune_backbone,
                         bf16=config.bf16, seed=config.seed)
    finetune, predictions = _finetune_and_predict(loaded, train, evaluation, vocab, cfg)
    metrics = _score(predictions, evaluation)
    if config.late_fusion_baseline:  # the same budget, the head on the unimodal CLS states
        _, late_predictions = _finetune_and_predict(loaded, train, evaluation, vocab, cfg,
                                                    fusion="late")
        metrics.update({f"late_fusion/{key}": value
                        for key, value in _score(late_predictions, evaluation).items()})
    baselines, baseline_answers = _baselines(train, evaluation)
    result = {
        "task": "vqa",
        "dataset": {"train": [str(p) for p in files["train"]],
                    "eval": [str(p) for p in files["eval"]]},
        "model": loaded.info.path,
        "step": loaded.info.step,
        "num_train_questions": len(train),
        "num_eval_questions": len(evaluation),
        "num_answers": len(vocab.answers),
        "finetune": finetune,
        "metrics": metrics,
        "baselines": baselines,
        "baseline_answers": baseline_answers,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_result(result, out, [{"question_id": q, "answer": a} for q, a in predictions.items()],
                 results_out)
    return result


def _finetune_and_predict(loaded: LoadedModel, train, evaluation, vocab, cfg: FinetuneConfig,
                          fusion: str = "fused") -> tuple[dict, dict[int, str]]:
    """Fine-tune a copy of the loaded model (the original stays untouched for the caller);
    (fine-tune stats, question_id -> answer on the eval split)."""
    model = copy.deepcopy(loaded.model)
    stats = finetune_vqa(model, loaded.tokenizer, train, vocab, cfg, fusion)
    return stats, predict_vqa(model, loaded.tokenizer, evaluation, vocab, cfg.batch_size * 2,
                              cfg.bf16)


def _split_files(config: VQAConfig) -> dict:
    """{"train"|"eval": (questions, annotations)}; explicit paths win over `vqa_dir` discovery."""
    files = {}
    for name in ("train", "eval"):
        split = getattr(config, f"{name}_split")
        questions = getattr(config, f"{name}_questions")
        annotations = getattr(config, f"{name}_annotations")
        if questions is None or annotations is None:
            if config.vqa_dir is None:
                raise UserError(f"give --vqa-dir, or both --{name}-questions and "
                                f"--{name}-annotations")
            found = find_split_files(config.vqa_dir, split)
            questions, annotations = questions or found[0], annotations or found[1]
        files[name] = (Path(questions), Path(annotations))
    return files


def _score(predictions: dict[int, str], examples: list[VQAExample]) -> dict[str, float]:
    return score_predictions(predictions, {e.question_id: list(e.answers) for e in examples},
                             {e.question_id: e.answer_type for e in examples},
                             {e.question_id: e.question_type for e in examples
                              if e.question_type is not None})


def _baselines(train: list[VQAExample], evaluation: list[VQAExample]) -> tuple[dict, dict]:
    """(metrics, answers) of the majority and per-answer-type majority baselines."""
    overall, by_type = Counter(), defaultdict(Counter)
    for example in train:
        for answer in map(normalize_answer, example.answers):
            overall[answer] += 1
            by_type[example.answer_type][answer] += 1
    majority = overall.most_common(1)[0][0]
    per_type = {t: c.most_common(1)[0][0] for t, c in sorted(by_type.items())}
    metrics = {
        "majority": _score({e.question_id: majority for e in evaluation}, evaluation),
        "type_prior": _score({e.question_id: per_type.get(e.answer_type, majority)
                              for e in evaluation}, evaluation),
    }
    return metrics, {"majority": majority, "type_prior": per_type}
