"""The evaluation jobs' typed configs: one set of defaults, shared by the CLI and the suite."""
from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from vlp.pipeline.cli import build_parser
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.jobs import JOBS
from vlp.pipeline.eval.configs import CaptionConfig, RetrievalConfig, VQAConfig
from vlp.pipeline.eval.job_config import config_from_args, config_from_mapping


def job_parser(name: str):
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    return eval_parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_every_setting_is_an_option_whose_help_shows_the_config_default(job):
    parser = job_parser(job.name)
    options = {action.dest: action for action in parser._actions}
    for spec in fields(job.config):
        action = options[spec.name]
        if spec.default is MISSING:
            assert action.required, spec.name
        elif spec.default not in (None, False):
            shown = " ".join(spec.default) if isinstance(spec.default, tuple) else spec.default
            assert f"(default: {shown})" in action.help, spec.name


def parse(name: str, *argv: str):
    args = build_parser().parse_args(["eval", name, "--checkpoint", "c", *argv])
    return config_from_args(next(j for j in JOBS if j.name == name).config, args)


def test_options_left_out_take_the_config_defaults():
    assert parse("retrieval", "--shards", "a.tar") == RetrievalConfig(shards=("a.tar",))
    assert parse("caption", "--karpathy-json", "k.json", "--image-root", "r") == CaptionConfig(
        karpathy_json=Path("k.json"), image_root=Path("r"))


def test_list_and_boolean_options():
    config = parse("caption", "--karpathy-json", "k.json", "--image-root", "r",
                   "--train-split", "a", "--train-split", "b", "c", "--no-spice", "--bf16")
    assert (config.train_splits, config.spice, config.bf16) == (("a", "b", "c"), False, True)


def test_the_cli_and_the_suite_build_the_same_config(tmp_path):
    from_cli = parse("vqa", "--vqa-dir", str(tmp_path / "vqa"), "--steps", "5", "--lr", "1")
    from_suite = config_from_mapping(VQAConfig, {"vqa_dir": "vqa", "steps": 5, "lr": 1},
                                     "suite", base=tmp_path)
    assert from_cli == from_suite == VQAConfig(vqa_dir=tmp_path / "vqa", steps=5, lr=1.0)


@pytest.mark.parametrize("values,message", [
    ({"batch_size": 0, "shards": "a"}, "batch_size must be >= 1, got 0"),
    ({"batch_size": "8", "shards": "a"}, "batch_size must be int, got '8'"),
    ({"bf16": 1, "shards": "a"}, "bf16 must be bool, got 1"),
    ({"rerank_k": True, "shards": "a"}, "rerank_k must be int, got True"),
    ({"shards": []}, "shards must be a non-empty list of str"),
    ({}, "give either --karpathy-json"),
    ({"karpathy_json": "k.json"}, "--karpathy-json needs --image-root"),
])
def test_bad_values_are_one_error_naming_the_setting(values, message):
    with pytest.raises(UserError, match=message):
        RetrievalConfig(**values)


def test_cross_field_rules():
    with pytest.raises(UserError, match="give --steps or --epochs, not both"):
        VQAConfig(vqa_dir="v", steps=1, epochs=1.0)
    with pytest.raises(UserError, match="length_penalty must be a finite number"):
        CaptionConfig(karpathy_json="k", image_root="r", length_penalty=float("nan"))
