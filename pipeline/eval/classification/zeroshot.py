"""Zero-shot classification: class names in prompt templates become the classifier.

Every (class, template) prompt is encoded; a class's embedding is the mean of its prompts'
normalised embeddings, normalised again (CLIP's prompt ensembling, as CLIP_benchmark's
`zero_shot_classifier` builds it). An image is scored against every class by cosine similarity.
Templates come from a file, else the dataset's own templates file, else DEFAULT_TEMPLATES.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.pipeline.data.errors import warn
from vlp.pipeline.data.model_loading import LoadedModel, load_model
from vlp.pipeline.data.tokenizer import unknown_token_words
from vlp.pipeline.eval.classification.data import load_classification, read_templates
from vlp.pipeline.eval.classification.features import encode_set, result_header
from vlp.pipeline.eval.classification.metrics import chance_metrics, classification_metrics
from vlp.pipeline.eval.configs import ZeroShotConfig
from vlp.pipeline.eval.encode import encode_texts
from vlp.pipeline.eval.results import write_result

# The seven ImageNet prompts CLIP's authors found to ensemble best (CLIP's prompt-engineering
# notebook), a small general-purpose default.
DEFAULT_TEMPLATES = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)


def class_embeddings(loaded: LoadedModel, classnames: list[str], templates: list[str],
                     batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """(C, D) normalised class embeddings: the normalised mean over templates per class."""
    texts = [template.format(c=name) for name in classnames for template in templates]
    emb = encode_texts(loaded.model, loaded.tokenizer, texts, loaded.info.config["max_text_len"],
                       batch_size, bf16)  # (C * T, D), normalised
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def evaluate_zeroshot(checkpoint: str | Path | LoadedModel, config: ZeroShotConfig, *,
                      out: str | Path | None = None, device: str = "cpu") -> dict:
    """Zero-shot acc1/acc5/mean_per_class_recall on DATASET/SPLIT, with the chance baseline.

    `dataset` is an ImageFolder or CLIP_benchmark webdataset root (see data.py); `classnames`
    and `templates` are files that replace the dataset's own. The data is read and checked
    before a checkpoint path is loaded (onto `device`). Writes `out` when given.
    """
    data = load_classification(config.dataset, config.split, config.classnames)
    prompts = (read_templates(config.templates) if config.templates is not None
               else data.templates or list(DEFAULT_TEMPLATES))
    loaded = (checkpoint if isinstance(checkpoint, LoadedModel)
              else load_model(checkpoint, device=device))
    batch_size, bf16 = config.batch_size, config.bf16
    unknown = _unknown_prompt_words(loaded, data.classnames, prompts)
    start = time.perf_counter()
    classes = class_embeddings(loaded, data.classnames, prompts, batch_size * 4, bf16)
    features = encode_set(loaded, data, batch_size, bf16)
    result = {
        **result_header("zeroshot_classification", loaded, data),
        "num_images": len(features.y),
        "num_templates": len(prompts),
        "unknown_prompt_words": unknown,
        "metrics": classification_metrics(features.x @ classes.T, features.y),
        "baselines": {"chance": chance_metrics(len(data.classnames))},
        "skipped": features.skipped,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_result(result, out)
    return result


def _unknown_prompt_words(loaded: LoadedModel, classnames: list[str],
                          templates: list[str]) -> list[str]:
    """The prompts' words the tokenizer turns into its unknown token, with a warning: a class
    whose name vanishes is told apart by the rest of its prompt only."""
    texts = [template.format(c=name) for name in classnames for template in templates]
    unknown = unknown_token_words(loaded.tokenizer, texts)
    if unknown:
        warn(f"zero-shot prompts hold {len(unknown)} word(s) the tokenizer maps to "
             f"{loaded.tokenizer.unk_token}: {', '.join(unknown[:10])}; train the tokenizer on "
             "text that has them, or rename the classes")
    return unknown
