"""Export round trip (bitwise) and the checked loader's error messages."""
import json
import os
import stat

import pytest
import torch

from vlp.models import (
    UnifiedModel,
    from_pretrained,
    load_config,
    load_state_dict_checked,
    save_pretrained,
)
from vlp.models.export import CONFIG_FILE


def trained_model(**overrides) -> UnifiedModel:
    """A small model whose weights moved away from their initial values, with a VQA head."""
    torch.manual_seed(0)
    config = load_config("tiny", **{"vocab_size": 60, "width": 32, "heads": 2, **overrides})
    model = UnifiedModel(config)
    model.attach_vqa_head(4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


def test_round_trip_is_exact(tmp_path):
    model = trained_model()
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {"type": "WordPiece"}}')
    out = save_pretrained(model, tmp_path / "export", tokenizer_path=tokenizer)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "configuration_vlp.py", "model.safetensors",
        "modeling_vlp.py", "open_clip", "tokenizer.json"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["vqa_num_answers"] == 4 and meta["width"] == 32
    assert (out / "tokenizer.json").read_text() == tokenizer.read_text()

    loaded = from_pretrained(out)
    assert not loaded.training and loaded.config == model.config
    assert loaded.mlm_head.decoder.weight is loaded.text_embed.token.weight  # still tied
    expected, actual = model.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    g = torch.Generator().manual_seed(0)
    images, ids = torch.randn(2, 3, 64, 64, generator=g), torch.randint(4, 60, (2, 9), generator=g)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    with torch.no_grad():
        for method, args in [("encode_image", (images,)), ("encode_text", (ids, mask)),
                             ("itm_logits", (images, ids, mask)),
                             ("vqa_logits", (images, ids, mask))]:
            expected = getattr(model, method)(*args)
            assert torch.equal(getattr(loaded, method)(*args), expected), method


def test_checked_load_names_mismatched_keys():
    state = trained_model().state_dict()
    with pytest.raises(ValueError, match="another config") as error:
        load_state_dict_checked(trained_model(vocab_size=70), state)
    assert "text_embed.token.weight: checkpoint (60, 32) vs model (70, 32)" in str(error.value)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['blocks.4"):
        load_state_dict_checked(trained_model(depth=6), state)
    with pytest.raises(ValueError, match=r"attach_vqa_head"):
        no_vqa_head = UnifiedModel(load_config("tiny", vocab_size=60, width=32, heads=2))
        load_state_dict_checked(no_vqa_head, state)


def test_checked_load_accepts_ddp_prefixes_and_one_name_for_tied_weights():
    source, target = trained_model(), trained_model()
    with torch.no_grad():
        target.text_embed.token.weight.zero_()
    state = {f"module.{k}": v for k, v in source.state_dict().items()
             if k != "mlm_head.decoder.weight"}  # tied: stored once, as safetensors does
    load_state_dict_checked(target, state)
    assert torch.equal(target.mlm_head.decoder.weight, source.text_embed.token.weight)


def test_unknown_format_version_is_refused(tmp_path):
    out = save_pretrained(trained_model(), tmp_path)
    meta = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        from_pretrained(out)


@pytest.mark.parametrize("num_answers", ["5", 0, 2.5, True])
def test_a_vqa_answer_count_that_is_not_a_count_is_one_line(tmp_path, num_answers):
    """`"vqa_num_answers": "5"` gave a TypeError from torch.empty while building the head."""
    out = save_pretrained(trained_model(), tmp_path)
    meta = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**meta, "vqa_num_answers": num_answers}))
    with pytest.raises(ValueError, match=r"config.json: vqa_num_answers must be a positive "
                                         rf"integer or null, got {num_answers!r}$"):
        from_pretrained(out)


def test_the_loss_weights_travel_with_the_weights(tmp_path):
    """config.json records the objectives the weights were trained with (the captioning job
    refuses to decode with an LM head that never trained); older files mean the defaults."""
    from vlp.models import LossWeights

    model = trained_model()
    model.loss_weights = LossWeights(mlm=0.5, lm=0.25)
    out = save_pretrained(model, tmp_path / "export")
    assert from_pretrained(out).loss_weights == LossWeights(mlm=0.5, lm=0.25)
    meta = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({k: v for k, v in meta.items()
                                               if k != "loss_weights"}))
    assert from_pretrained(out).loss_weights == LossWeights()  # lm = 0: never trained
    (out / CONFIG_FILE).write_text(json.dumps({**meta, "loss_weights": {"lm": 1, "cap": 1}}))
    with pytest.raises(ValueError, match=r"unknown loss_weights key\(s\) \['cap'\]"):
        from_pretrained(out)


def test_export_files_are_readable_by_the_group_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        out = save_pretrained(trained_model(), tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [out, *out.rglob("*")]}
    assert modes["export"] == modes["export/open_clip"] == 0o755
    assert {mode for name, mode in modes.items() if not name.endswith(("export", "open_clip"))} \
        == {0o644}
    assert "export/README.md" in modes


def test_an_int8_export_over_a_float_one_leaves_no_interop_files_of_the_old_weights(tmp_path):
    """transformers and open_clip read float weights only; files the float export wrote for them
    would describe weights that are gone."""
    from vlp.models.quantize import quantize_layers

    out = save_pretrained(trained_model(), tmp_path / "export")
    (out / "notes.txt").write_text("kept")
    model = trained_model()
    quantize_layers(model, {"image_proj": "dynamic"})
    save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors", "notes.txt"]
    assert "auto_map" not in json.loads((out / CONFIG_FILE).read_text())
    assert from_pretrained(out).image_proj.weight.dtype == torch.int8
