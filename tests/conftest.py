"""Session fixtures: a small synthetic world, its shards (downloaded with the real img2dataset
from a loopback server) and a tokenizer trained on them. Each is built once per test session.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from vlp.data_prep.prepare import download_world, train_world_tokenizer
from vlp.pipeline.distributed import free_port
from vlp.data_prep.synth import generate_world
from vlp.pipeline.cli import main as vlp

WORLD_TRAIN, WORLD_TEST, WORLD_SEED = 160, 32, 0
SHARD_IMAGE_SIZE, SAMPLES_PER_SHARD = 64, 32
TOKENIZER_VOCAB = 400


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """160 training images, 32 retrieval test images, 80/16 VQA images; base_url on a free port."""
    path = tmp_path_factory.mktemp("world")
    base_url = f"http://127.0.0.1:{free_port()}"
    generate_world(path, WORLD_TRAIN, WORLD_TEST, seed=WORLD_SEED, base_url=base_url)
    return path


@pytest.fixture(scope="session")
def shard_dir(world_dir, tmp_path_factory):
    """The world's URL list downloaded into 5 indexed shards of 32 samples at 64 px."""
    path = tmp_path_factory.mktemp("shards")
    download_world(world_dir, path, SHARD_IMAGE_SIZE, SAMPLES_PER_SHARD)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(world_dir, shard_dir, tmp_path_factory):
    """WordPiece tokenizer trained on the shard captions and the VQA training questions."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_world_tokenizer(world_dir, shard_dir, path, TOKENIZER_VOCAB)
    return path


@pytest.fixture(scope="session")
def eval_tokenizer(world_dir, tmp_path_factory):
    """tokenizer.json of a 300-word tokenizer trained on the world's texts."""
    from test_eval_support import train_world_tokenizer

    return train_world_tokenizer(world_dir, tmp_path_factory.mktemp("eval_tokenizer"))


@pytest.fixture(scope="session")
def zero3_run(eval_tokenizer, tmp_path_factory):
    """A single-rank ZeRO-3 run directory with tags at steps 1 and 2 (test_eval_support); tests
    that change it work on a copy."""
    from test_eval_support import train_zero3_run

    run = tmp_path_factory.mktemp("zero3_run") / "tiny"
    train_zero3_run(run, eval_tokenizer, save_steps=(1, 2))
    return run


@pytest.fixture
def vlp_data():
    """Run `vlp data ARG...` in-process, through the `vlp` command's own error handling; returns
    the exit status."""

    def run(*argv: str) -> int:
        return vlp(["data", *map(str, argv)])

    return run


@pytest.fixture
def one_rank():
    """A one-process gloo group for code that calls torch.distributed."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tokenizer_json(eval_tokenizer):
    """The evaluation tokenizer's tokenizer.json, under the name the classification tests use."""
    return eval_tokenizer


@pytest.fixture(scope="module")
def tiny(eval_tokenizer):
    """The untrained tiny model with the evaluation tokenizer, as evaluation jobs load it."""
    from test_eval_support import tiny_eval_model

    return tiny_eval_model(eval_tokenizer)
