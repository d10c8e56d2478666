"""Zero-shot classification: metrics on oracle scores, both dataset layouts of the synthetic
world, a perfect zero-shot model, and bad input. The linear probe is in tests/test_eval_probe.py."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_eval_support import spy_loading_and_autocast

from vlp.data_prep.scenes import COLOURS
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import LoadedModel
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS
from vlp.pipeline.eval.classification.data import load_classification
from vlp.pipeline.eval.classification.metrics import chance_metrics, classification_metrics
from vlp.pipeline.eval.classification.zeroshot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    evaluate_zeroshot,
)
from vlp.pipeline.eval.configs import ZeroShotConfig
from vlp.pipeline.eval.images import tar_samples

KEYS = ["acc1", "acc5", "mean_per_class_recall"]


def dataset(world_dir, task, layout):
    return world_dir / "classification" / task / layout


# ---- metrics ------------------------------------------------------------------------------------

def test_perfect_scores_give_one_and_chance_is_one_over_classes():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])
    metrics = classification_metrics(torch.eye(6)[labels], labels)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert chance_metrics(6) == pytest.approx(
        {"acc1": 1 / 6, "acc5": 5 / 6, "mean_per_class_recall": 1 / 6})
    assert list(chance_metrics(3)) == ["acc1", "mean_per_class_recall"]  # no top-5 of 3


def test_known_confusion_gives_hand_computed_metrics():
    # 6 classes; class scores rank the classes in the order of each row's list.
    orders = [[0, 1, 2, 3, 4, 5],   # label 0: rank 0
              [1, 0, 2, 3, 4, 5],   # label 0: rank 1
              [5, 4, 3, 2, 1, 0],   # label 0: rank 5 (outside the top 5)
              [1, 2, 3, 4, 5, 0],   # label 1: rank 0
              [2, 3, 4, 5, 1, 0],   # label 1: rank 4
              [2, 0, 1, 3, 4, 5]]   # label 2: rank 0
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    scores = torch.zeros(6, 6)
    for row, order in enumerate(orders):
        scores[row, order] = torch.arange(6, 0, -1).float()
    metrics = classification_metrics(scores, labels)
    assert metrics["acc1"] == pytest.approx(3 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)
    # recall per class present: class 0 1/3, class 1 1/2, class 2 1/1
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)


def test_ties_and_nan_scores_count_against_the_image():
    labels = torch.tensor([0, 1, 2])
    metrics = classification_metrics(torch.ones(3, 3), labels)  # a collapsed model
    assert metrics == {"acc1": 0.0, "mean_per_class_recall": 0.0}
    scores = torch.eye(3)
    scores[0, 0] = scores[1, 2] = float("nan")  # image 0: its own score, image 1: another's
    assert classification_metrics(scores, labels) == pytest.approx(
        {"acc1": 1 / 3, "mean_per_class_recall": 1 / 3})


def test_top5_is_reported_from_exactly_five_classes():
    labels = torch.tensor([0, 1, 2, 3, 4])
    scores = torch.eye(5)[labels.roll(1)]  # each image scores the previous one's class first
    assert classification_metrics(scores, labels) == {
        "acc1": 0.0, "acc5": 1.0, "mean_per_class_recall": 0.0}
    assert chance_metrics(5) == pytest.approx(
        {"acc1": 1 / 5, "acc5": 1.0, "mean_per_class_recall": 1 / 5})


def test_labels_may_be_a_uint8_array_as_cifar_stores_them():
    labels = np.array([2, 0, 1, 1], dtype=np.uint8)
    scores = torch.eye(3)[[2, 0, 1, 0]]  # the last image is wrong
    assert classification_metrics(scores, labels) == pytest.approx(
        {"acc1": 3 / 4, "mean_per_class_recall": (1 + 1 / 2 + 1) / 3})


def test_classes_without_test_images_are_left_out_of_the_mean_recall():
    labels = torch.tensor([0, 0, 3])  # classes 1 and 2 have no test images
    scores = torch.eye(4)[[0, 1, 3]]
    assert classification_metrics(scores, labels)["mean_per_class_recall"] == pytest.approx(
        (1 / 2 + 1) / 2)


# ---- the synthetic world's datasets -------------------------------------------------------------

def test_both_layouts_hold_the_same_images_and_labels(world_dir):
    for task in ("shape", "colour"):
        shards = load_classification(dataset(world_dir, task, "wds"), "test")
        folders = load_classification(dataset(world_dir, task, "imagefolder"), "test")
        assert len(shards.images) == len(folders.images) == 16
        by_bytes = {ref.read(): shards.classnames[label]
                    for ref, label in zip(shards.images, shards.labels)}
        assert {ref.read(): folders.classnames[label]
                for ref, label in zip(folders.images, folders.labels)} == by_bytes
        assert shards.templates == folders.templates and "{c}" in shards.templates[0]


def test_tar_images_are_byte_ranges_of_the_shard(world_dir):
    shard = dataset(world_dir, "shape", "wds") / "test/0.tar"
    samples = list(tar_samples(shard, frozenset({"cls"})))
    key, image, members = samples[0]
    assert key == "s0000000" and members == {"cls": b"0"}
    folder = dataset(world_dir, "shape", "imagefolder") / "test/circle/000000.jpg"
    assert image.read() == folder.read_bytes()


def test_zeroshot_gives_the_same_result_on_both_layouts(tiny, world_dir, tmp_path):
    results = [
        evaluate_zeroshot(
            tiny,
            ZeroShotConfig(dataset=dataset(world_dir, "colour", layout)),
            out=tmp_path / f"{layout}.json",
        )
        for layout in ("wds", "imagefolder")
    ]
    assert json.loads((tmp_path / "wds.json").read_text()) == results[0]
    for result in results:
        assert list(result["metrics"]) == KEYS
        assert (result["num_images"], result["num_classes"], result["num_templates"]) == (16, 7, 10)
        assert result["baselines"]["chance"]["acc1"] == pytest.approx(1 / 7)
        assert result["task"] == "zeroshot_classification" and 0 <= result["seconds"] < 600
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"])


def test_zeroshot_loads_a_path_onto_the_device_encodes_in_bf16_and_times_itself(
        tiny, world_dir, monkeypatch):
    from vlp.pipeline.eval.classification import zeroshot

    loads, casts = spy_loading_and_autocast(monkeypatch, zeroshot, tiny)
    clock = iter([10.0, 11.23456, 20.0, 21.0])
    monkeypatch.setattr(zeroshot, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    config = ZeroShotConfig(dataset=dataset(world_dir, "colour", "wds"), bf16=True)
    result = evaluate_zeroshot("runs/tiny", config, device="cuda:3")
    assert loads == [("runs/tiny", "cuda:3")] and set(casts) == {True}
    assert result["seconds"] == 1.235  # rounded to the millisecond
    evaluate_zeroshot("runs/tiny", config)
    assert loads[-1] == ("runs/tiny", "cpu")  # the default device


class ColourOracle(torch.nn.Module):
    """A perfect zero-shot model of the colour task: an image's embedding is the one-hot of the
    palette colour nearest to its object's pixels, a text's the one-hot of its colour word."""

    def __init__(self, tokenizer, colours):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the jobs find the device from it
        self.palette = torch.tensor([COLOURS[c] for c in colours], dtype=torch.float)
        self.word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(colours))
        assert tokenizer.unk_token_id not in self.word_ids

    def encode_image(self, images):
        pixels = images.float().flatten(2).transpose(1, 2)  # (B, P, 3)
        # the dark backgrounds stay below 100 in every channel, every object colour reaches 150
        object_mask = (pixels.amax(dim=2) > 120).float()[..., None]
        mean = (pixels * object_mask).sum(1) / object_mask.sum(1)
        nearest = torch.cdist(mean, self.palette).argmin(dim=1)
        return torch.eye(len(self.palette))[nearest]

    def encode_text(self, ids, mask):
        return (ids[:, :, None] == self.word_ids).any(dim=1).float()


def test_a_perfect_zero_shot_model_scores_one_on_both_layouts(tiny, world_dir):
    colours = load_classification(dataset(world_dir, "colour", "wds")).classnames
    oracle = LoadedModel(ColourOracle(tiny.tokenizer, colours), tiny.tokenizer, tiny.info)
    for layout in ("wds", "imagefolder"):
        for split in ("train", "test"):
            result = evaluate_zeroshot(
                oracle, ZeroShotConfig(dataset=dataset(world_dir, "colour", layout), split=split)
            )
            assert result["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


class ColourWords(torch.nn.Module):
    """A text encoder that embeds a prompt as the normalised counts of the colour words in it."""

    def __init__(self, tokenizer, colours):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(colours))

    def encode_text(self, ids, mask):
        counts = (ids[:, :, None] == self.word_ids).sum(dim=1).float()
        return torch.nn.functional.normalize(counts, dim=-1)


def test_a_class_embedding_is_the_normalised_mean_of_its_prompts(tiny, monkeypatch):
    from vlp.pipeline.eval import encode

    casts, autocast = [], encode.autocast
    monkeypatch.setattr(encode, "autocast", lambda device, bf16: casts.append(bf16) or (
        autocast(device, bf16)))
    red, green, blue = "red", "green", "blue"
    encoder = LoadedModel(ColourWords(tiny.tokenizer, [red, green, blue]), tiny.tokenizer,
                          tiny.info)
    # "red" -> (1, 0, 0) and "red blue" -> (1, 0, 1) / sqrt(2): their mean, normalised
    emb = class_embeddings(encoder, [red, green], ["{c}", "{c} " + blue], batch_size=1)
    assert set(casts) == {False}  # full precision unless bf16 is asked for
    s = 2 ** -0.5
    assert torch.allclose(emb, torch.nn.functional.normalize(
        torch.tensor([[1 + s, 0, s], [0, 1 + s, s]]), dim=-1))


def test_zeroshot_reads_the_split_it_names(tiny, world_dir, tmp_path):
    """The train split's images are moved one class folder on: its labels contradict the pixels,
    so the perfect model scores 0 there and 1 on the untouched test split."""
    root = tmp_path / "colour"
    shutil.copytree(dataset(world_dir, "colour", "imagefolder"), root)
    names = sorted(p.name for p in (root / "train").iterdir())
    for i, name in enumerate(names):
        (root / "train" / name).rename(root / "train" / f"tmp{i}")
    for i, name in enumerate(names):
        (root / "train" / f"tmp{i}").rename(root / "train" / names[(i + 1) % len(names)])
    oracle = LoadedModel(ColourOracle(tiny.tokenizer, names), tiny.tokenizer, tiny.info)
    wrong = evaluate_zeroshot(oracle, ZeroShotConfig(dataset=root, split="train"))["metrics"]
    assert (wrong["acc1"], wrong["mean_per_class_recall"]) == (0.0, 0.0)
    right = evaluate_zeroshot(oracle, ZeroShotConfig(dataset=root))["metrics"]
    assert right == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_prompt_words_the_tokenizer_cannot_spell_are_named(tiny, world_dir, tmp_path, capsys):
    root = dataset(world_dir, "shape", "imagefolder")
    names = sorted(path.name for path in (root / "test").iterdir())
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("\n".join(["\u2603", *names[1:]]) + "\n")  # a character never seen
    result = evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root, classnames=classnames))
    assert result["unknown_prompt_words"] == ["\u2603"]
    assert "warning: zero-shot prompts hold 1 word(s) the tokenizer maps to [UNK]: \u2603" in (
        capsys.readouterr().err)
    assert evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root))["unknown_prompt_words"] == []
    circled = [chr(0x2460 + i) for i in range(11)]  # eleven unseen characters: ten are named
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c} " + " ".join(circled) + "\n")
    result = evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root, templates=templates))
    assert result["unknown_prompt_words"] == circled
    assert ("warning: zero-shot prompts hold 11 word(s) the tokenizer maps to [UNK]: "
            f"{', '.join(circled[:10])}; train the tokenizer on text that has them, or rename the "
            "classes\n") in capsys.readouterr().err


def test_templates_from_a_file_and_the_default_set(tiny, world_dir, tmp_path):
    root = tmp_path / "shape"
    shutil.copytree(dataset(world_dir, "shape", "imagefolder"), root)
    (root / "zeroshot_classification_templates.txt").unlink()
    assert evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root))["num_templates"] == len(
        DEFAULT_TEMPLATES
    )
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c}\n\nthere is a {c}\n")
    with pytest.raises(UserError, match="blank line"):
        evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root, templates=templates))
    templates.write_text("a {c}\nthere is a {}\n")
    with pytest.raises(UserError, match=r"templates.txt:2: .*\{c\}"):
        evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root, templates=templates))
    templates.write_text("a {c}\n")
    assert (
        evaluate_zeroshot(tiny, ZeroShotConfig(dataset=root, templates=templates))["num_templates"]
        == 1
    )


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_classnames_and_empty_class_folder_are_errors(world_dir, tmp_path):
    shards = tmp_path / "wds"
    shutil.copytree(dataset(world_dir, "shape", "wds"), shards)
    (shards / "classnames.txt").unlink()
    with pytest.raises(UserError, match="no classnames.txt"):
        load_classification(shards)
    (shards / "classnames.txt").write_text("circle\nsquare\n")
    with pytest.raises(UserError, match="label 2, but .* names only 2 classes"):
        load_classification(shards)

    folders = tmp_path / "imagefolder"
    shutil.copytree(dataset(world_dir, "shape", "imagefolder"), folders)
    (folders / "test/hexagon").mkdir()
    with pytest.raises(UserError, match=r"class folder\(s\) \['hexagon'\] hold no images"):
        load_classification(folders)
    with pytest.raises(UserError, match="split .*validation not found"):
        load_classification(folders, "validation")


def test_a_damaged_shard_or_a_sample_without_label_is_an_error(world_dir, tmp_path):
    import webdataset as wds

    shards = tmp_path / "wds"
    shutil.copytree(dataset(world_dir, "shape", "wds"), shards)
    tar = shards / "test/0.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"0.tar is unreadable \(corrupt_tar\): truncated"):
        load_classification(shards)
    with wds.TarWriter(str(tar), encoder=False) as sink:
        sink.write({"__key__": "nolabel", "jpg": b"\xff\xd8"})
    with pytest.raises(UserError, match="sample 'nolabel' has no .cls member"):
        load_classification(shards)


def write_split(root, shards: dict[str, list[dict]]):
    """DATASET root with classes a, b, c and test/NAME tars holding `shards`' samples."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("a\nb\nc\n")
    for name, samples in shards.items():
        with wds.TarWriter(str(root / "test" / name), encoder=False) as sink:
            for sample in samples:
                sink.write(sample)


JPEG = b"\xff\xd8 (not decoded when the split is read)"


def test_nshards_txt_names_the_shards_to_read_else_every_tar_is(tmp_path):
    write_split(tmp_path, {"0.tar": [{"__key__": "x", "jpg": JPEG, "cls": b"2"}],
                           "1.tar": [{"__key__": "y", "png": JPEG, "cls": b" 1\n"}]})
    assert load_classification(tmp_path).labels == [2, 1]
    (tmp_path / "test/nshards.txt").write_text("1\n")
    assert load_classification(tmp_path).labels == [2]


@pytest.mark.parametrize("sample, nshards, message", [
    ({"__key__": "x", "cls": b"0", "txt": b"no image"}, None,
     "{shard}: sample 'x' has no image (" + "/".join(IMAGE_EXTENSIONS) + ")"),
    ({"__key__": "x", "jpg": JPEG, "cls": b"\xff"}, None,
     "{shard}: sample 'x': its .cls member should be the label as a number, got '\ufffd'"),
    ({"__key__": "x", "jpg": JPEG, "cls": "\u00b2".encode()}, None,
     "{shard}: sample 'x': its .cls member should be the label as a number, got '\u00b2'"),
    ({"__key__": "x", "jpg": JPEG, "cls": b"0"}, "\u00b2",
     "{count} should hold the number of shards, got '\u00b2'"),
])
def test_each_bad_shard_split_is_one_exact_line(sample, nshards, message, tmp_path):
    write_split(tmp_path, {"0.tar": [sample]})
    if nshards is not None:
        (tmp_path / "test/nshards.txt").write_text(nshards)
    with pytest.raises(UserError) as error:
        load_classification(tmp_path)
    assert str(error.value) == message.format(shard=tmp_path / "test/0.tar",
                                              count=tmp_path / "test/nshards.txt")


def folder_split(root, classes=("a", "b")):
    """DATASET root with test/<class>/0.png per class (never decoded here)."""
    for name in classes:
        (root / "test" / name).mkdir(parents=True)
        (root / "test" / name / "0.png").write_bytes(b"png")


TEMPLATES = "zeroshot_classification_templates.txt"
# kind -> (files written beside a two-class image folder, load_classification's file arguments,
# the message, with {root} for the dataset root)
FOLDER_SET_PROBLEMS = {
    "class names against folders": (
        {"classnames.txt": b"a\nb\nc\n"}, {},
        "{root}/classnames.txt names 3 classes but {root}/test has 2 class folders"),
    "a blank class name": (
        {"classnames.txt": b"a\n\nb\n\n"}, {},
        "class names file {root}/classnames.txt has a blank line (line 2); write one entry per "
        "line"),
    "empty class names": (
        {"names.txt": b"\n"}, {"classnames": "names.txt"},
        "class names file {root}/names.txt is empty; write one entry per line"),
    "no class names file": (
        {}, {"classnames": "names.txt"}, "class names file not found: {root}/names.txt"),
    "class names not UTF-8": (
        {"classnames.txt": b"caf\xe9\nb\n"}, {},
        "class names file {root}/classnames.txt is not UTF-8 text: 'utf-8' codec can't decode "
        "byte 0xe9 in position 3: invalid continuation byte"),
    "a template without {c}": (
        {TEMPLATES: b"a photo of a {c}.\nhi\n"}, {},
        "{root}/" + TEMPLATES + ":2: template 'hi' must contain {{c}} exactly once (where the "
        "class name goes) and no other {{...}} field; write {{{{ }}}} for braces"),
    "a malformed template": (
        {TEMPLATES: b"a {c\n"}, {},
        "{root}/" + TEMPLATES + ":1: template 'a {{c' is malformed: expected '}}' before end of "
        "string"),
    "empty templates": (
        {TEMPLATES: b""}, {},
        "prompt templates file {root}/" + TEMPLATES + " is empty; write one entry per line"),
}


def make_bad_set(kind, root):
    """A dataset under `root` with one problem; returns (load_classification's kwargs, the
    message it must raise, with {root} for the dataset root)."""
    if kind == "no split":
        folder_split(root)
        (root / "train").mkdir()
        return {"split": "validation"}, (
            "classification split {root}/validation not found (splits present: ['test', "
            "'train']); expected DATASET/SPLIT/<class>/<image> or DATASET/SPLIT/*.tar")
    if kind == "shards without class names":
        write_split(root, {"0.tar": [{"__key__": "x", "jpg": JPEG, "cls": b"0"}]})
        (root / "classnames.txt").unlink()
        return {}, ("{root} has no classnames.txt (one class name per line, in label order); "
                    "CLIP_benchmark's webdataset layout needs it, or pass a class-names file")
    if kind in FOLDER_SET_PROBLEMS:
        files, kwargs, message = FOLDER_SET_PROBLEMS[kind]
        folder_split(root)
        for name, data in files.items():
            (root / name).write_bytes(data)
        return {key: root / value for key, value in kwargs.items()}, message
    if kind == "a label past the class names":
        write_split(root, {"0.tar": [{"__key__": "x", "jpg": JPEG, "cls": b"3"}]})
        return {}, ("{root}/test/0.tar: sample 'x' has label 3, but {root}/classnames.txt names "
                    "only 3 classes (labels count from 0)")
    if kind == "no images":
        write_split(root, {"0.tar": [{"__key__": "x", "jpg": JPEG, "cls": b"0"}]})
        (root / "test/nshards.txt").write_text("0")
        return {}, "{root}/test: no images"
    if kind == "empty class folders":
        folder_split(root, classes=("a",))
        for name in "bcdefg":
            (root / "test" / name).mkdir()
        (root / "test/b/notes.txt").write_text("not an image")
        return {}, ("{root}/test: class folder(s) ['b', 'c', 'd', 'e', 'f'] hold no images ("
                    + "/".join(IMAGE_EXTENSIONS) + "); every class needs at least one, or remove "
                    "the folder (labels are the sorted folder names)")
    assert kind == "no class folders"
    (root / "test").mkdir(parents=True)
    (root / "test/.cache").mkdir()
    return {}, "{root}/test has no class folders; an ImageFolder tree is ROOT/<class>/<image>"


@pytest.mark.parametrize("kind", [
    "no split", "shards without class names", *FOLDER_SET_PROBLEMS, "no class folders",
    "a label past the class names", "no images", "empty class folders"])
def test_each_bad_classification_set_is_one_exact_line(kind, tmp_path):
    kwargs, message = make_bad_set(kind, tmp_path)
    with pytest.raises(UserError) as error:
        load_classification(tmp_path, **kwargs)
    assert str(error.value) == message.format(root=tmp_path)


def test_a_set_of_images_is_named_by_its_split_and_holds_them_in_label_order(tmp_path):
    """Hidden folders are no classes; files count by their last extension; a linked folder
    inside a class (a data mount) is followed."""
    folder_split(tmp_path, classes=("b", "a", ".hidden"))
    for name in ("README", "0.v2.png", "1.png.txt"):
        (tmp_path / "test/a" / name).write_bytes(b"x")
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount/2.jpg").write_bytes(b"jpg")
    (tmp_path / "test/b/linked").symlink_to(tmp_path / "mount")
    loaded = load_classification(tmp_path)
    assert loaded.source == str(tmp_path / "test") and loaded.classnames == ["a", "b"]
    assert [(os.path.relpath(ref.path, tmp_path / "test"), label)
            for ref, label in zip(loaded.images, loaded.labels)] == [
        ("a/0.png", 0), ("a/0.v2.png", 0), ("b/0.png", 1), ("b/linked/2.jpg", 1)]


def test_undecodable_images_are_skipped_and_counted(tiny, world_dir, tmp_path):
    import webdataset as wds

    folders = tmp_path / "imagefolder"
    shutil.copytree(dataset(world_dir, "shape", "imagefolder"), folders)
    (folders / "test/circle/broken.jpg").write_bytes(b"not a jpeg")
    result = evaluate_zeroshot(tiny, ZeroShotConfig(dataset=folders))
    assert result["skipped"] == {"bad_image": 1} and result["num_images"] == 16

    shards = tmp_path / "wds"
    shutil.copytree(dataset(world_dir, "shape", "wds"), shards)
    with wds.TarWriter(str(shards / "test/1.tar"), encoder=False) as sink:
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8 truncated", "cls": b"0"})
    (shards / "test/nshards.txt").write_text("2\n")
    result = evaluate_zeroshot(tiny, ZeroShotConfig(dataset=shards))
    assert result["skipped"] == {"bad_image": 1} and result["num_images"] == 16
