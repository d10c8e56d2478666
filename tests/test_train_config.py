"""Training configuration: recipes, overrides and the DeepSpeed config built from them."""
import json
import re
from pathlib import Path

import pytest
from train_helpers import train_overrides

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.train.config import load_train_config
from vlp.pipeline.train.optim import warmup_cosine
from vlp.pipeline.train.trainer import build_ds_config, check_run

REPO = Path(__file__).resolve().parents[1]


def test_recipe_loads_and_overrides_apply():
    cfg = load_train_config(REPO / "pipeline/recipes/tiny_synth.yaml",
                            ["optim.lr=3e-4", "optim.max_steps=20", "optim.warmup_steps=5",
                             "data.sampling=resampled", "data.weights=[1, 2]"])
    assert cfg.model.name == "tiny"
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as text; it is converted
    assert cfg.optim.max_steps == 20
    assert cfg.data.weights == [1, 2]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key(s) optim.lrr"),
    ("modle.name=tiny", "unknown config key(s) modle"),
    ("optim.max_steps=abc", "optim.max_steps"),
    ("optim=3", "optim must be a mapping"),
    ("optim.lr", "must look like section.key=value"),
    # Out of range: each once passed the config and failed later (ZeroDivisionError after the
    # first step), or did nothing.
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1, got 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
    ("optim.grad_accum=0", "optim.grad_accum must be >= 1, got 0"),
    ("dist_timeout_s=-1", "config.dist_timeout_s must be >= 1, got -1"),
    ("dist_backend=nccl;gloo", "dist_backend 'nccl;gloo' must be a backend name"),
    ("faults.inject_nonfinite_at=[0]", "faults.inject_nonfinite_at steps count from 1"),
    ("faults.crash_during_save_at_step=-1", "faults.crash_during_save_at_step must be >= 0"),
    ("data.max_member_mb=0", "data.max_member_mb must be a finite number > 0"),
    ("data.max_member_mb=inf", "data.max_member_mb must be a finite number > 0, got inf"),
    ("data.shuffle_buffer_mb=0", "data.shuffle_buffer_mb must be a finite number > 0"),
    ("data.verify=md5", "data.verify: 'md5' is not one of size, sha256, none"),
    ("checkpoint.overwrite=maybe", "checkpoint.overwrite: 'maybe' is not a valid bool"),
    ("data.edited_negatives=true", "edited_negatives needs data.lexicon"),
    # YAML reads inf and .nan as floats: each passed `vlp train --dry-run`.
    ("optim.lr=inf", "optim.lr must be > 0 and finite, got inf"),
    ("model.itc_weight=inf", "model.*_weight must be >= 0, finite and not all 0, got (inf,"),
    ("model.lm_weight=.nan", "model.*_weight must be >= 0, finite and not all 0"),
    ("distill.itc_weight=inf", "distill.itc_weight and mlm_weight must be >= 0 and finite"),
    ("distill.temperature=inf", "distill.temperature must be > 0 and finite, got inf"),
    ("optim.grad_clip=inf", "optim.grad_clip must be >= 0 and finite"),
    ("optim.warmup_steps=1001", "optim.warmup_steps 1001 is longer than max_steps 1000: the lr "
                                "would never leave warmup"),
    ("dist_timeout_s=1000000000000000", "config.dist_timeout_s must be at most 604800 (a week)"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as excinfo:
        load_train_config(None, [override])
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_every_recipe_is_valid():
    for recipe in sorted((REPO / "pipeline/recipes").glob("*.yaml")):
        cfg = load_train_config(recipe)
        assert (REPO / cfg.ds_config).exists(), f"{recipe.name} names a missing DeepSpeed config"


def test_ds_config_takes_batch_and_clipping_from_the_recipe(tmp_path):
    cfg = load_train_config(None, ["optim.batch_size=8", "optim.grad_accum=4", "optim.grad_clip=0.5",
                                   f"ds_config={REPO / 'ds_configs/zero3_cpu.json'}"])
    ds = build_ds_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]

    clashing = tmp_path / "ds.json"
    clashing.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_batch_size"):
        build_ds_config(load_train_config(None, [f"ds_config={clashing}"]))


@pytest.mark.parametrize("content, message", [
    ("{\"zero_optimization\": ", "is not valid JSON: Expecting value"),
    ("[1]", "must be a JSON object, got list"),
])
def test_a_ds_config_that_is_not_a_json_object_is_one_line(tmp_path, content, message):
    """It gave a JSONDecodeError traceback in `vlp train --dry-run`."""
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(UserError, match=f"^ds_config {re.escape(str(path))} {message}"):
        load_train_config(None, [f"ds_config={path}"])


def test_warmup_then_cosine_to_the_floor():
    cfg = load_train_config(None, ["optim.warmup_steps=10", "optim.max_steps=110",
                                   "optim.min_lr_ratio=0.1"]).optim
    assert warmup_cosine(0, cfg) == pytest.approx(0.1)
    assert warmup_cosine(9, cfg) == pytest.approx(1.0)
    assert warmup_cosine(60, cfg) == pytest.approx(0.55)
    assert warmup_cosine(110, cfg) == pytest.approx(0.1)
    assert warmup_cosine(500, cfg) == pytest.approx(0.1)


def test_weight_decay_spares_positions_cls_types_and_vectors():
    from vlp.models import UnifiedModel, load_config
    from vlp.pipeline.train.optim import parameter_groups

    model = UnifiedModel(load_config("tiny", vocab_size=50, position_embedding="learned"))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"image_embed.pos", "image_embed.cls", "text_embed.pos", "type_embed.weight",
            "logit_scale", "norm.weight", "blocks.0.attn.qkv.bias"} <= spared
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.attn.qkv.weight", "image_embed.patch.weight",
            "text_embed.token.weight"} <= decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(spared) + len(decayed) == len(names)


def test_shipped_ds_config_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(overrides=["ds_config=ds_configs/zero2_cpu.json"])
    assert Path(config.ds_config).is_file() and Path(config.ds_config).is_absolute()
    (tmp_path / "mine.json").write_text("{}")
    assert load_train_config(overrides=["ds_config=mine.json"]).ds_config == "mine.json"
    with pytest.raises(ValueError, match="ds_config ds_configs/nope.json: no such file"):
        load_train_config(overrides=["ds_config=ds_configs/nope.json"])


def test_shm_buffers_of_one_job_are_removed_and_others_kept():
    import os

    from vlp.pipeline.distributed import remove_shm_buffers

    uid, shm = os.getuid(), Path("/dev/shm")
    ours = [shm / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_61234_{r}" for r in (0, 1)]
    other = shm / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_61235_0"
    for path in (*ours, other):
        path.write_bytes(b"x")
    try:
        remove_shm_buffers(61234, rank=1)
        assert ours[0].exists() and not ours[1].exists()
        remove_shm_buffers(61234)
        assert not ours[0].exists() and other.exists()
    finally:
        for path in (*ours, other):
            path.unlink(missing_ok=True)


def test_vlp_train_removes_dead_jobs_shm_buffers_when_it_starts(tmp_path, capsys):
    """A job killed before its cleanup left its 69 MB buffers in /dev/shm for good; `vlp train`
    now removes those no process holds before it launches, and leaves a live job's alone."""
    import os
    import subprocess

    from vlp.pipeline.train.launch import run_training

    uid, shm = os.getuid(), Path("/dev/shm")
    dead = shm / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_61236_0"
    live = shm / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_61237_0"
    for path in (dead, live):
        path.write_bytes(b"x")
    with open(live, "rb") as held:  # a running job holds its buffer open, as DeepSpeed does
        holder = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        with pytest.raises(UserError, match="--nproc must be >= 1"):
            run_training(None, [], nproc=0)  # refused after the cleanup, nothing started
        assert not dead.exists() and live.exists()
        assert "removed" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
        for path in (dead, live):
            path.unlink(missing_ok=True)


def test_distillation_and_edited_negatives_are_refused_together():
    with pytest.raises(ValueError, match="set data.edited_negatives=false"):
        load_train_config(None, ["distill.teacher=export/teacher", "data.lexicon=lexicon.json",
                                 "data.edited_negatives=true"])


def test_a_tokenizer_directory_without_tokenizer_json_fails_the_dry_run(tmp_path, shard_dir):
    """An HF directory of vocab.txt alone loads (transformers builds the fast tokenizer), but
    every checkpoint stores tokenizer.json: the dry run passed, then every rank died reading it."""
    tokenizer = tmp_path / "bert-vocab"
    tokenizer.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    (tokenizer / "vocab.txt").write_text("\n".join(words) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class":
                                                                 "BertTokenizer"}))
    with pytest.raises(UserError) as raised:
        check_run(None, train_overrides(tmp_path / "run", shard_dir, tokenizer), world=1)
    assert str(raised.value) == (
        f"data.tokenizer: {tokenizer} has no tokenizer.json, which checkpoints store as the "
        "tokenizer; write one with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")


def test_the_quickstart_trains_its_recipe_for_the_recipe_s_steps():
    """`vlp quickstart --max-steps` defaults to the recipe's length (two numbers kept equal)."""
    from vlp.pipeline.quickstart import QuickstartConfig

    recipe = load_train_config(REPO / "pipeline/recipes/tiny_synth.yaml")
    assert QuickstartConfig().max_steps == recipe.optim.max_steps == 1080
