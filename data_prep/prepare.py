"""The whole data stage on the synthetic world in one call: synth -> serve -> download -> index ->
tokenizer. Used by the quickstart and the test fixtures.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from vlp.data_prep.download import download_shards
from vlp.data_prep.server import serve_world
from vlp.pipeline.distributed import free_port
from vlp.data_prep.synth import generate_world
from vlp.data_prep.tokenizer import iter_vqa_questions, sample_shard_captions, train_tokenizer


def world_paths(world_dir, world: dict | None = None) -> dict[str, Path]:
    """Absolute paths of a world's files, from `world` (what generate_world returned) or, when
    not given, its world.json."""
    world_dir = Path(world_dir)
    if world is None:
        world = json.loads((world_dir / "world.json").read_text())
    files = world["files"]
    paths = {
        "world": world_dir,
        "train_url_list": world_dir / files["train_url_list"],
        "retrieval_json": world_dir / files["retrieval_json"],
        "retrieval_image_root": world_dir / files["retrieval_image_root"],
        # Karpathy JSON with train and test splits, for captioning
        "caption_json": world_dir / files["caption_json"],
        "caption_image_root": world_dir / files["caption_image_root"],
        # The VQA directory: question/annotation files, and images/{split}/ (vqa_image_pattern).
        "vqa_image_root": world_dir / Path(files["vqa"]["train"]["questions"]).parent,
        # Edited captions in SugarCrepe's layout (image root: the world) and the word lexicon
        "compositionality_dir": world_dir / files.get("compositionality", "compositionality"),
        "lexicon": world_dir / files.get("lexicon", "lexicon.json"),
    }
    for split, split_files in files["vqa"].items():
        paths[f"vqa_{split}_questions"] = world_dir / split_files["questions"]
        paths[f"vqa_{split}_annotations"] = world_dir / split_files["annotations"]
    # Classification datasets: classification_shape_wds, classification_colour_imagefolder, ...
    for task, layouts in world.get("classification", {}).get("files", {}).items():
        for layout, path in layouts.items():
            paths[f"classification_{task}_{layout}"] = world_dir / path
    return paths


def download_world(world_dir, shard_dir, image_size: int, number_sample_per_shard: int,
                   world: dict | None = None, **kwargs):
    """Serve the world at its loopback base URL and download its URL list into fresh shards."""
    with serve_world(world_dir):
        return download_shards(
            world_paths(world_dir, world)["train_url_list"],
            shard_dir,
            image_size=image_size,
            number_sample_per_shard=number_sample_per_shard,
            allow_private_hosts=True,  # the world lives on 127.0.0.1
            incremental=False,
            **kwargs,
        )


def train_world_tokenizer(world_dir, shard_dir, out_dir, vocab_size: int,
                          world: dict | None = None) -> Path:
    """Train the tokenizer on the shard captions and the VQA training questions."""
    questions = iter_vqa_questions(world_paths(world_dir, world)["vqa_train_questions"])
    texts = itertools.chain(sample_shard_captions(shard_dir), questions)
    return train_tokenizer(texts, out_dir, vocab_size)


def prepare_synthetic_data(
    out_dir,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 64,
    vocab_size: int = 400,
    number_sample_per_shard: int = 1000,
    n_vqa_train: int | None = None,
    n_vqa_val: int | None = None,
    processes: int = 1,
    threads: int = 8,
) -> dict:
    """Build OUT/world, OUT/shards (indexed) and OUT/tokenizer; return their paths (see
    `world_paths`) plus "shards", "tokenizer" and the download summary under "download".
    """
    out = Path(out_dir)
    world_dir = out / "world"
    world = generate_world(
        world_dir, n_train, n_test, seed=seed, base_url=f"http://127.0.0.1:{free_port()}",
        n_vqa_train=n_vqa_train, n_vqa_val=n_vqa_val,
    )  # fmt: skip
    summary = download_world(
        world_dir, out / "shards", image_size, number_sample_per_shard,
        world=world, processes=processes, threads=threads,
    )  # fmt: skip
    train_world_tokenizer(world_dir, out / "shards", out / "tokenizer", vocab_size, world)
    return {
        **world_paths(world_dir, world),
        "shards": out / "shards",
        "tokenizer": out / "tokenizer",
        "download": summary,
    }
