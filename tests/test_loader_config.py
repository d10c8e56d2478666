"""The loader's up-front checks: every DataConfig range at its bounds with its exact message,
plan_shards' refusals and its plan, and on_rank0 on two gloo ranks (this process and a forked
child) against one process."""
from __future__ import annotations

import datetime
import math
import os

import pytest
import torch.distributed as dist
from test_loader import make_dataset

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.loader import DataConfig, on_rank0, plan_shards
from vlp.pipeline.distributed import free_port

ACCEPTED_AT_THE_BOUNDS = [
    dict(num_workers=0), dict(prefetch_factor=1), dict(shuffle_buffer=0),
    dict(max_member_mb=0.5), dict(max_member_mb=1e300),
    dict(shuffle_buffer_mb=0.5), dict(shuffle_buffer_mb=1e300),
    dict(read_buffer_mb=1 / 1024), dict(read_buffer_mb=1024),
    dict(read_concurrency=1), dict(read_concurrency=64),
    dict(read_retries=0), dict(read_retries=10),
    dict(max_unreadable_share=0), dict(max_unreadable_share=1),
    dict(block_shards=None), dict(block_shards=1),
    dict(mlm_probability=0.001), dict(mlm_probability=0.999),
    dict(lexicon="lexicon.json"), dict(lexicon="lexicon.json", edited_negatives=True),
    dict(edit_class_weights={"shape": 0.5, "colour": 3}), dict(edit_class_weights={"shape": 1e300}),
    dict(sampling="resampled", weights=[0.5, 2]),
    dict(image_keys=["JPG", "png"], caption_key="TXT"),
]


@pytest.mark.parametrize("fields", ACCEPTED_AT_THE_BOUNDS)
def test_each_setting_is_accepted_at_its_bounds(fields):
    assert {k: getattr(DataConfig(**fields), k) for k in fields} == fields


REFUSED = [
    (dict(num_workers=-1), "data.num_workers must be >= 0, got -1"),
    (dict(prefetch_factor=0), "data.prefetch_factor must be >= 1, got 0"),
    (dict(shuffle_buffer=-1), "data.shuffle_buffer must be >= 0, got -1"),
    (dict(max_member_mb=0), "data.max_member_mb must be a finite number > 0, got 0"),
    (dict(max_member_mb=math.inf), "data.max_member_mb must be a finite number > 0, got inf"),
    (dict(shuffle_buffer_mb=0), "data.shuffle_buffer_mb must be a finite number > 0, got 0"),
    (dict(shuffle_buffer_mb=math.inf),
     "data.shuffle_buffer_mb must be a finite number > 0, got inf"),
    (dict(read_buffer_mb=0.000976),  # just under 1/1024 = 0.0009765625
     "data.read_buffer_mb must be in [1/1024, 1024], got 0.000976"),
    (dict(read_buffer_mb=1024.5), "data.read_buffer_mb must be in [1/1024, 1024], got 1024.5"),
    (dict(read_concurrency=0), "data.read_concurrency must be in [1, 64], got 0"),
    (dict(read_concurrency=65), "data.read_concurrency must be in [1, 64], got 65"),
    (dict(read_retries=-1), "data.read_retries must be in [0, 10], got -1"),
    (dict(read_retries=11), "data.read_retries must be in [0, 10], got 11"),
    (dict(max_unreadable_share=-0.01),
     "data.max_unreadable_share must be in [0, 1], got -0.01"),
    (dict(max_unreadable_share=1.01), "data.max_unreadable_share must be in [0, 1], got 1.01"),
    (dict(block_shards=0), "data.block_shards must be >= 1 or null, got 0"),
    (dict(mlm_probability=0.0), "data.mlm_probability must be in (0, 1), got 0.0"),
    (dict(mlm_probability=1.0), "data.mlm_probability must be in (0, 1), got 1.0"),
    (dict(edited_negatives=True), "data.edited_negatives needs data.lexicon (a word-class JSON)"),
    (dict(edit_class_weights={"shape": 0}),
     "data.edit_class_weights {'shape': 0} must be finite numbers > 0"),
    (dict(edit_class_weights={"shape": 2, "size": math.inf}),
     "data.edit_class_weights {'shape': 2, 'size': inf} must be finite numbers > 0"),
    (dict(edit_class_weights={"shape": "3"}),
     "data.edit_class_weights {'shape': '3'} must be finite numbers > 0"),
    (dict(weights=[1.0, 2.0]),
     "data.weights only apply with sampling=resampled: set it or drop the weights"),
    (dict(sampling="resampled", weights=[1.0, 0]), "data.weights [1.0, 0] must be positive numbers"),
    (dict(sampling="resampled", weights=[]), "data.weights [] must be positive numbers"),
    (dict(image_keys=[]), "data.image_keys [] must be among "
                          "('jpg', 'jpeg', 'png', 'webp')"),
    (dict(image_keys=["jpg", "txt"]), "data.image_keys ['jpg', 'txt'] must be among "
                                      "('jpg', 'jpeg', 'png', 'webp')"),
    (dict(caption_key="JPG"), "data.caption_key 'JPG' must be one of ('txt', 'text', 'caption')"),
]


@pytest.mark.parametrize("fields, message", REFUSED)
def test_each_setting_is_refused_past_its_bounds_with_its_message(fields, message):
    with pytest.raises(UserError) as refused:
        DataConfig(**fields)
    assert str(refused.value) == message


@pytest.mark.parametrize("fields", [dict(image_keys=["jpg", "PYD"]), dict(caption_key="pth")])
def test_pickle_formats_are_refused_as_members_that_run_code(fields):
    named = fields.get("image_keys", [fields.get("caption_key")])[-1]
    with pytest.raises(UserError) as refused:
        DataConfig(**fields)
    assert str(refused.value) == (
        f"refusing to decode [{named!r}] members: only images (jpg, jpeg, png, webp) and "
        "captions (txt, text, caption) are decoded; pickle-based formats (.pyd, .pth, .pickle) "
        "run code when loaded and are never unpickled.")


# ------------------------------------------------------------------------------- plan_shards

@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> str:
    """4 shards x 3 samples with their manifest."""
    return make_dataset(tmp_path_factory.mktemp("shards"), shards=4, per_shard=3)


@pytest.mark.parametrize("workers, world, message", [
    (0, 5, "4 shards cannot feed 5 ranks x 1 workers = 5 streams (each needs at least one shard "
           "per epoch): use at most 4 ranks, write more (smaller) shards with `vlp data reshard`, "
           "or use data.sampling=resampled."),
    (3, 2, "4 shards cannot feed 2 ranks x 3 workers = 6 streams (each needs at least one shard "
           "per epoch): set data.num_workers to at most 2, write more (smaller) shards with `vlp "
           "data reshard`, or use data.sampling=resampled."),
])
def test_too_few_shards_for_the_streams_is_refused_with_the_fix(four_shards, workers, world,
                                                                message):
    with pytest.raises(UserError) as refused:
        plan_shards(DataConfig(shards=four_shards, num_workers=workers), 1, world)
    assert str(refused.value) == message


def test_one_weight_per_source_is_required(four_shards):
    two_sources = four_shards.replace("{00000..00003}", "{00000..00001}") + "::" + \
        four_shards.replace("{00000..00003}", "{00002..00003}")
    config = DataConfig(shards=two_sources, sampling="resampled", weights=[1.0])
    with pytest.raises(UserError) as refused:
        plan_shards(config, 1, 1)
    assert str(refused.value) == ("data.weights [1.0] must be 2 numbers, one per '::'-separated "
                                  "source")


def test_the_plan_counts_every_shard_and_needs_one_step_of_samples(four_shards):
    config = DataConfig(shards=four_shards, num_workers=0)
    plan = plan_shards(config, 6, 2)  # 12 samples: exactly one step
    urls = [four_shards.replace("{00000..00003}", f"{s:05d}") for s in range(4)]
    assert plan.sources.all_urls == urls and plan.counts == dict.fromkeys(urls, 3)
    assert plan_shards(DataConfig(shards=four_shards, num_workers=2), 6, 2).counts == plan.counts
    with pytest.raises(UserError) as refused:
        plan_shards(config, 7, 2)
    assert str(refused.value) == ("an epoch of 12 samples is less than one step of batch_size 7 x "
                                  "2 ranks; lower optim.batch_size")


# --------------------------------------------------------------------------------- on_rank0

def _on_rank0_twice(rank: int, port: int) -> tuple[list, object, str]:
    """Rank `rank` of two: the calls of fn it made, on_rank0's result for an fn returning its
    rank, and the message of the UserError on_rank0 raised for an fn that refuses on rank 0."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    calls = []

    def answer():
        calls.append(rank)
        return {"rank": rank}

    def refuse():
        calls.append(rank)
        if rank == 0:
            raise UserError("shard 00002.tar has 1 byte too many")
        return "accepted"

    try:
        result = on_rank0(answer)
        try:
            on_rank0(refuse)
            message = ""
        except UserError as exc:
            message = str(exc)
        return calls, result, message
    finally:
        dist.destroy_process_group()


def test_on_rank0_runs_fn_once_on_rank_0_and_every_rank_gets_its_result_or_its_error():
    expected = ([0, 0], {"rank": 0}, "shard 00002.tar has 1 byte too many")
    port = free_port()
    child = os.fork()
    if child == 0:  # rank 1: exit status 0 when it called nothing and got rank 0's verdicts
        code = 1
        try:
            code = 0 if _on_rank0_twice(1, port) == ([], *expected[1:]) else 1
        finally:
            os._exit(code)
    assert _on_rank0_twice(0, port) == expected
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_a_process_group_on_rank0_is_a_plain_call():
    assert not dist.is_initialized()
    assert on_rank0(lambda: [1, 2]) == [1, 2]
    with pytest.raises(UserError, match="^no shards$"):
        on_rank0(lambda: (_ for _ in ()).throw(UserError("no shards")))
