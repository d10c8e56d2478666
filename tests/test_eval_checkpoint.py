"""Loading models for evaluation: real ZeRO-3 checkpoints, export directories, and bad ones."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_eval_support import tiny_eval_model

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import load_model


def assert_weights_equal(model, reference_path):
    reference = load_file(reference_path)
    state = model.state_dict()
    for name, weight in reference.items():
        assert torch.equal(state[name].float(), weight), name


def test_zero3_checkpoints_dir_resolves_latest_and_consolidates(zero3_run):
    model, tokenizer, info = load_model(zero3_run / "checkpoints")
    assert (info.kind, info.tag, info.step) == ("deepspeed", "global_step2", 2)
    assert not model.training
    assert tokenizer("a red circle")["input_ids"][0] == tokenizer.cls_token_id
    assert_weights_equal(model, zero3_run / "reference_step2.safetensors")


def test_zero3_tag_dir_loads_that_step(zero3_run):
    model, _, info = load_model(zero3_run / "checkpoints/global_step1")
    assert info.step == 1
    assert_weights_equal(model, zero3_run / "reference_step1.safetensors")
    step2 = load_file(zero3_run / "reference_step2.safetensors")
    assert not torch.equal(model.state_dict()["itm_head.weight"], step2["itm_head.weight"])


def test_export_directory(eval_tokenizer, tmp_path):
    from vlp.models.export import save_pretrained

    tiny = tiny_eval_model(eval_tokenizer, seed=3)
    save_pretrained(tiny.model, tmp_path / "export", tokenizer_path=eval_tokenizer)
    model, _, info = load_model(tmp_path / "export")
    assert (info.kind, info.step) == ("export", None)
    for name, weight in tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name


def corrupt_copy(zero3_run, tmp_path):
    tag = tmp_path / "checkpoints/global_step2"
    shutil.copytree(zero3_run / "checkpoints/global_step2", tag)
    return tag


def test_missing_or_truncated_shard_is_reported_before_deepspeed_opens_it(zero3_run, tmp_path):
    tag = corrupt_copy(zero3_run, tmp_path)
    optim = next(tag.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"corrupt checkpoint .*{optim.name}.*truncated"):
        load_model(tag)
    optim.unlink()
    with pytest.raises(UserError, match=rf"{optim.name} is missing"):
        load_model(tag)


def test_garbage_shard_of_the_right_size_is_caught_by_its_checksum(zero3_run, tmp_path):
    tag = corrupt_copy(zero3_run, tmp_path)
    model_states = next(tag.glob("*model_states.pt"))
    model_states.write_bytes(b"\0" * model_states.stat().st_size)
    with pytest.raises(UserError, match=rf"{model_states.name} has the recorded size but not the "
                                        "recorded sha256"):
        load_model(tag)


def test_incomplete_tag_and_non_checkpoints(zero3_run, tmp_path):
    tag = corrupt_copy(zero3_run, tmp_path)
    (tag / "vlp_state.json").unlink()
    with pytest.raises(UserError, match="no vlp_state.json"):
        load_model(tag)
    (tmp_path / "checkpoints/latest").write_text("global_step9")
    with pytest.raises(UserError, match="names tag 'global_step9'"):
        load_model(tmp_path / "checkpoints")
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        load_model(tmp_path / "nowhere")


def test_weights_of_another_config_are_refused(eval_tokenizer, tmp_path):
    from vlp.models.export import save_pretrained

    tiny = tiny_eval_model(eval_tokenizer)
    save_pretrained(tiny.model, tmp_path / "export", tokenizer_path=eval_tokenizer)
    config = json.loads((tmp_path / "export/config.json").read_text())
    (tmp_path / "export/config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(UserError, match="cannot load export .*probably from another config"):
        load_model(tmp_path / "export")
    (tmp_path / "export/config.json").write_text(json.dumps({**config, "widht": 8}))
    with pytest.raises(UserError, match="widht"):
        load_model(tmp_path / "export")
    (tmp_path / "export/config.json").write_text("{")
    with pytest.raises(UserError, match="cannot load export"):
        load_model(tmp_path / "export")


_PEAK_GROWTH = """
import resource, sys
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.data.errors import UserError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1])
except UserError as exc:
    print(str(exc).splitlines()[0][:300])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_bad_export_config_is_one_line_before_anything_is_allocated(eval_tokenizer, tmp_path):
    """A string width gave a raw TypeError, and absurd sizes built (allocated) the model before
    the weights were compared with it."""
    from vlp.models.export import save_pretrained

    export = tmp_path / "export"
    save_pretrained(tiny_eval_model(eval_tokenizer).model, export, tokenizer_path=eval_tokenizer)
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "width": "768"}))
    with pytest.raises(UserError, match=r"config.json: width must be a positive integer, got "
                                        r"'768'$"):
        load_model(export)
    (export / "config.json").write_text(json.dumps({**config, "depth": 10**9}))
    with pytest.raises(UserError, match="depth 1000000000, but the weights hold"):
        load_model(export)

    # width 2048 instead of 64: a 0.8 GB model, if it were built before the check
    (export / "config.json").write_text(json.dumps({**config, "width": 2048}))
    done = subprocess.run([sys.executable, "-c", _PEAK_GROWTH, str(export)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, grown_mb = done.stdout.strip().splitlines()
    assert "checkpoint does not fit this model" in message, done.stderr[-2000:]
    assert int(grown_mb) < 100, f"memory grew {grown_mb} MB before the refusal"
