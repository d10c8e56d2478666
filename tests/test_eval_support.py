"""Helpers shared by the evaluation tests (no tests here): a tokenizer trained on the synthetic
world's text and an untrained tiny model, as the evaluation jobs receive them."""
from __future__ import annotations

import json
from pathlib import Path

TINY = {"depth": 2, "width": 64, "heads": 2, "fusion_layers": 1, "embed_dim": 32}


def world_texts(world: Path) -> list[str]:
    karpathy = json.loads((world / "retrieval/dataset_synth.json").read_text())
    texts = [s["raw"] for image in karpathy["images"] for s in image["sentences"]]
    for questions in sorted((world / "vqa").glob("*_questions.json")):
        texts += [q["question"] for q in json.loads(questions.read_text())["questions"]]
    return texts


def train_world_tokenizer(world: Path, out_dir: Path) -> Path:
    from data_prep.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(world), out_dir, vocab_size=300)


def tiny_eval_model(tokenizer_json: Path, seed: int = 0):
    """An EvalModel (untrained tiny UnifiedModel + tokenizer) built in memory."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from models.config import load_config
    from models.model import UnifiedModel
    from pipeline.eval.checkpoint import CheckpointInfo, EvalModel

    tokenizer = load_tokenizer(tokenizer_json)
    config = load_config("tiny", vocab_size=len(tokenizer), **TINY)
    torch.manual_seed(seed)
    model = UnifiedModel(config).eval()
    info = CheckpointInfo(path="memory", kind="export", tag=None, step=None,
                          config=config.to_dict())
    return EvalModel(model, tokenizer, info)
