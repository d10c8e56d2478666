"""The compositionality evaluation: the world's edited captions differ from the true ones in
exactly the edit, and the job scores true against edited caption per kind of edit."""
import io
import json
import re
import shutil
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_support import tiny_eval_model, train_world_tokenizer

from vlp.data_prep.captions import POSITION_PHRASES
from vlp.data_prep.compositionality import EDIT_KINDS, caption_pair
from vlp.data_prep.scenes import COLOURS, SHAPES, Obj, Scene, WorldSpec
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel
from vlp.pipeline.eval.configs import CompositionalityConfig
from vlp.pipeline.eval.compositionality.data import load_edit_sets
from vlp.pipeline.eval.compositionality.job import evaluate_compositionality
from vlp.pipeline.eval.images import ImageRef

THREE = Scene.of([Obj((0, 0), "circle", "red", "small"), Obj((1, 1), "square", "blue", "large"),
                  Obj((2, 2), "cross", "green", "small")])
PLACE_WORDS = {w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption)


def differing(a: str, b: str) -> list[tuple[str, str]]:
    """The changed stretches of words, each as (old words, new words) joined by spaces."""
    a, b = words(a), words(b)
    return [(" ".join(a[i1:i2]), " ".join(b[j1:j2]))
            for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b).get_opcodes() if op != "equal"]


@pytest.mark.parametrize("seed", range(20))
def test_each_edit_changes_exactly_what_its_kind_names(seed):
    spec = WorldSpec()
    pairs = {kind: caption_pair(THREE, kind, spec, np.random.default_rng(seed))
             for kind in EDIT_KINDS}
    allowed_words = {"replace_colour": set(COLOURS) | {"gray"}, "replace_shape": set(SHAPES),
             "replace_size": {"small", "little", "large", "big"}}
    for kind, allowed in allowed_words.items():
        [(old, new)] = differing(*pairs[kind])
        assert {old, new} <= allowed, (kind, old, new)
    for kind, allowed in (("swap_colour", set(COLOURS)), ("swap_shape", set(SHAPES))):
        true, edited = pairs[kind]
        (a, b), (c, d) = differing(true, edited)
        assert (a, b) == (d, c) and {a, b} <= allowed
    true, moved = pairs["move"]
    changes = differing(true, moved)
    assert changes and {w for pair in changes for part in pair for w in part.split()} \
        <= PLACE_WORDS
    true, dropped = pairs["drop"]  # fewer words, none new but the object count ("two shapes:")
    assert len(words(dropped)) < len(words(true))
    assert set(Counter(words(dropped)) - Counter(words(true))) <= {"two", "and"}


def test_edits_that_need_two_objects_do_not_apply_to_one():
    one = Scene.of([Obj((1, 1), "circle", "red", "small")])
    for kind in ("swap_colour", "swap_shape", "drop"):
        assert caption_pair(one, kind, WorldSpec(), np.random.default_rng(0)) is None


@pytest.fixture(scope="module")
def tiny(world_dir, tmp_path_factory):
    return tiny_eval_model(train_world_tokenizer(world_dir, tmp_path_factory.mktemp("tok")))


def test_the_world_result_per_kind_and_its_mirror(tiny, world_dir, tmp_path):
    result = evaluate_compositionality(
        tiny,
        CompositionalityConfig(edits=world_dir / "compositionality", image_root=world_dir),
        out=tmp_path / "c.json",
    )
    assert json.loads((tmp_path / "c.json").read_text())["metrics"] == result["metrics"]
    assert set(result["num_items"]) == set(EDIT_KINDS)
    assert result["num_items"]["replace_colour"] == 32  # every retrieval test image
    # Oracle: the same items with the captions' roles exchanged score 1 - accuracy (no ties).
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for kind in ("replace_colour", "swap_shape"):
        items = json.loads((world_dir / f"compositionality/{kind}.json").read_text())
        flipped = {k: {**v, "caption": v["negative_caption"], "negative_caption": v["caption"]}
                   for k, v in items.items()}
        (mirror / f"{kind}.json").write_text(json.dumps(flipped))
    flipped = evaluate_compositionality(
        tiny, CompositionalityConfig(edits=mirror, image_root=world_dir)
    )["metrics"]
    for kind in ("replace_colour", "swap_shape"):
        for scorer in ("itc", "itm"):
            assert flipped[f"{kind}/{scorer}"] == pytest.approx(
                1 - result["metrics"][f"{kind}/{scorer}"])
    assert flipped["mean/itc"] == pytest.approx(
        (flipped["replace_colour/itc"] + flipped["swap_shape/itc"]) / 2)
    assert result["baselines"]["chance"] == {"itc": 0.5, "itm": 0.5}


def test_a_caption_against_itself_is_never_preferred(tiny, world_dir, tmp_path):
    items = json.loads((world_dir / "compositionality/replace_shape.json").read_text())
    same = {k: {**v, "negative_caption": v["caption"]} for k, v in items.items()}
    (tmp_path / "same.json").write_text(json.dumps(same))
    metrics = evaluate_compositionality(
        tiny, CompositionalityConfig(edits=tmp_path / "same.json", image_root=world_dir)
    )["metrics"]
    assert metrics["same/itc"] == 0.0 and metrics["same/itm"] == 0.0


def test_aro_layout_with_its_box_crop(tiny, tmp_path):
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[:, 40:] = 255
    Image.fromarray(image).save(tmp_path / "vg.jpg")
    aro = [{"image_path": "vg.jpg", "true_caption": "a white square",
            "false_caption": "a black square", "bbox_x": 40, "bbox_y": 0, "bbox_w": 40,
            "bbox_h": 40, "relation_name": "none"}]
    (tmp_path / "VG_Attribution.json").write_text(json.dumps(aro))
    sets = load_edit_sets(tmp_path / "VG_Attribution.json", tmp_path)
    [item] = sets["VG_Attribution"]
    assert item.box == (40, 0, 80, 40)
    result = evaluate_compositionality(
        tiny,
        CompositionalityConfig(
            edits=tmp_path / "VG_Attribution.json", image_root=tmp_path, itm=False
        ),
    )
    assert set(result["metrics"]) == {"VG_Attribution/itc", "mean/itc"}


@pytest.mark.parametrize("content, message", [
    ("{cut", "cannot read {file}: Expecting property name enclosed in double quotes: line 1 "
             "column 2 (char 1)"),
    ("{}", "{file}: no items"),
    ('"a caption"', "{file}: expected SugarCrepe's {{id: {{filename, caption, negative_caption}}}}"
                    " or ARO's list of {{image_path, true_caption, false_caption}}"),
    ('[{"image_path": "x.jpg", "true_caption": 5, "false_caption": "y"}]',
     "{file}: item 0 lacks an image name, a caption or an edited one"),
    ('{"0": {"filename": "/etc/passwd", "caption": "x", "negative_caption": "y"}}',
     "{file}: image path '/etc/passwd' leads outside the image root {root}; paths in annotation "
     "files must stay under the image root (pass a common parent as the root)"),
])
def test_each_bad_edit_file_is_one_exact_line(content, message, tmp_path):
    file = tmp_path / "edits.json"
    file.write_text(content)
    with pytest.raises(UserError) as error:
        load_edit_sets(file, tmp_path / "images")
    assert str(error.value) == message.format(file=file, root=tmp_path / "images")


def test_bad_edit_sets_name_the_problem(world_dir, tmp_path):
    with pytest.raises(UserError, match="no edited-caption JSON"):
        load_edit_sets(tmp_path, world_dir)
    (tmp_path / "a.json").write_text(json.dumps({"0": {"filename": "missing.jpg",
                                                      "caption": "x", "negative_caption": "y"}}))
    with pytest.raises(UserError, match="missing.jpg not found"):
        load_edit_sets(tmp_path, world_dir)
    (tmp_path / "a.json").write_text(json.dumps({"0": {"filename": "../etc/passwd",
                                                      "caption": "x", "negative_caption": "y"}}))
    with pytest.raises(UserError, match="outside the image root"):
        load_edit_sets(tmp_path, world_dir)
    (tmp_path / "a.json").write_text(json.dumps({"0": {"filename": "x.jpg", "caption": "x"}}))
    with pytest.raises(UserError, match="lacks"):
        load_edit_sets(tmp_path, world_dir)
    shutil.rmtree(tmp_path)


def test_the_job_scores_itc_by_the_dot_product_and_itm_by_the_log_odds_on_stubs(
        tmp_path, monkeypatch):
    """Stub encoders and ITM scorer with known values: ITC scores are image . caption (the edit
    wins the first item: 2 > 1), ITM scores the log-odds given; both encoders and the scorer get
    bf16; a path loads onto the CPU by default, a loaded model is used as it is."""
    from vlp.pipeline.eval.compositionality import job

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    edits = tmp_path / "edits"
    edits.mkdir()
    (edits / "swap.json").write_text(json.dumps({
        "0": {"filename": "a.png", "caption": "true a", "negative_caption": "edit a"},
        "1": {"filename": "b.png", "caption": "true b", "negative_caption": "edit b"}}))
    (edits / "add.json").write_text(json.dumps({
        "0": {"filename": "a.png", "caption": "more a", "negative_caption": "less a"}}))
    images = {"a.png": [1.0, 4.0], "b.png": [2.0, 1.0]}
    texts = {"true a": [1.0, 0.0], "edit a": [0.0, 0.5], "true b": [1.0, 1.0],
             "edit b": [0.0, 1.0], "more a": [3.0, 0.0], "less a": [1.0, 0.0]}
    odds = torch.tensor([0.5, 2.0, 1.0, -1.0, 0.0, 0.0])  # per caption, in item order
    seen = {"loads": [], "bf16": [], "uses": []}
    loaded = LoadedModel("model", "tokenizer", SimpleNamespace(
        path="runs/x", step=7, kind="export", config={"image_size": 8, "max_text_len": 6}))

    def load_model(path, device="cpu"):
        seen["loads"].append((path, device))
        return loaded

    def encode_images(model, refs, size, batch_size, bf16):
        seen["bf16"].append(("images", bf16))
        return torch.tensor([images[Path(ref.path).name] for ref in refs])

    def encode_texts(model, tokenizer, captions, max_len, batch_size, bf16):
        seen["bf16"].append(("texts", bf16))
        return torch.tensor([texts[caption] for caption in captions])

    class Scorer:
        def __init__(self, loaded_, data, batch_size, bf16):
            seen["bf16"].append(("itm", bf16))

        def __call__(self, captions, images_):
            return odds[captions]

    def require_full_model(loaded_, use):
        seen["uses"].append(use)

    for name, stub in (("load_model", load_model), ("encode_images", encode_images),
                       ("encode_texts", encode_texts), ("ItmScorer", Scorer),
                       ("require_full_model", require_full_model)):
        monkeypatch.setattr(job, name, stub)
    clock = iter([10.0, 11.23456, 20.0, 21.0, 30.0, 31.0])
    monkeypatch.setattr(job, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    config = CompositionalityConfig(edits=edits, image_root=tmp_path, bf16=True)
    result = evaluate_compositionality("runs/x", config)
    assert evaluate_compositionality(loaded, config)["metrics"] == result["metrics"]
    evaluate_compositionality("runs/x", config, device="cuda:3")
    assert seen["loads"] == [("runs/x", "cpu"), ("runs/x", "cuda:3")]
    assert set(seen["bf16"]) == {("images", True), ("texts", True), ("itm", True)}
    assert seen["uses"] == ["ITM scoring of edited captions (itm=True)"] * 3
    assert result["metrics"] == {"add/itc": 1.0, "swap/itc": 0.5, "add/itm": 0.0,
                                 "swap/itm": 0.5, "mean/itc": 0.75, "mean/itm": 0.25}
    assert {k: result[k] for k in ("task", "dataset", "model", "step", "num_items")} == {
        "task": "compositionality", "dataset": str(edits), "model": "runs/x", "step": 7,
        "num_items": {"add": 1, "swap": 2}}
    assert result["seconds"] == 1.235  # rounded to the millisecond


def test_edited_items_give_one_image_per_file_and_box_and_their_caption_pairs(tmp_path):
    from vlp.pipeline.eval.compositionality.data import EditedItem
    from vlp.pipeline.eval.compositionality.job import CroppedImage, _as_retrieval_set

    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:4, 4:] = 255  # a white top-right quarter, in a greyscale file
    Image.fromarray(pixels).save(tmp_path / "a.png")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    data = _as_retrieval_set([EditedItem(a, "c1", "n1"), EditedItem(a, "c2", "n2"),
                              EditedItem(a, "c3", "n3", box=(4, 0, 8, 4)),
                              EditedItem(b, "c4", "n4")])
    assert [(type(ref), ref.path, getattr(ref, "box", None)) for ref in data.images] == [
        (ImageRef, str(a), None), (CroppedImage, str(a), (4, 0, 8, 4)), (ImageRef, str(b), None)]
    assert data.captions == ["c1", "n1", "c2", "n2", "c3", "n3", "c4", "n4"]
    assert data.text_to_image == [0, 0, 0, 0, 1, 1, 2, 2]
    assert data.source == "edited captions"
    with Image.open(io.BytesIO(data.images[1].read())) as crop:
        assert crop.format == "PNG" and np.array(crop).tolist() == [[[255] * 3] * 4] * 4
