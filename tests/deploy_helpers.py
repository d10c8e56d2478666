"""Helpers shared by the deployment tests (no tests here): a small float export on disk."""
from __future__ import annotations

from pathlib import Path

from test_eval_support import tiny_eval_model, train_world_tokenizer
from train_helpers import pattern_overrides


def write_tiny_export(world: Path, out: Path, seed: int = 0, **overrides) -> Path:
    """An untrained tiny model (test_eval_support.TINY, then `overrides`) saved as an export
    with a tokenizer trained on the world's text."""
    import torch

    from vlp.models.config import ModelConfig
    from vlp.models.export import save_pretrained
    from vlp.models.model import UnifiedModel

    tokenizer_json = train_world_tokenizer(world, out.with_name(out.name + "_tokenizer"))
    model = tiny_eval_model(tokenizer_json, seed).model
    if overrides:
        torch.manual_seed(seed)
        model = UnifiedModel(ModelConfig.from_dict(model.config.to_dict() | overrides))
    return save_pretrained(model, out, tokenizer_path=tokenizer_json)


def data_overrides(shard_dir: Path) -> list[str]:
    """train_helpers' short-run overrides on the world's shards, less the run directory, the
    tokenizer and the model: the deploy commands set those from their source export."""
    from vlp.pipeline.data.manifest import shard_url_pattern

    unused = shard_dir / "unused"
    return [o for o in pattern_overrides(unused, shard_url_pattern(shard_dir), unused)
            if o.split("=")[0] not in ("run_dir", "data.tokenizer", "model.overrides")]
