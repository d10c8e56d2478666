"""The linear probe: CLIP_benchmark's fit and weight-decay search on known features, the
validation split, the job on spies and the `vlp eval linear-probe` command."""
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_eval_classification import dataset
from test_eval_support import spy_loading_and_autocast

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.classification.features import Features
from vlp.pipeline.eval.classification.metrics import chance_metrics
from vlp.pipeline.eval.classification.probe import (
    COARSE,
    WEIGHT_DECAYS,
    ProbeSettings,
    evaluate_linear_probe,
    hold_out,
    probe_metrics,
    search_weight_decay,
    train_probe,
)
from vlp.pipeline.eval.configs import LinearProbeConfig

KEYS = ["acc1", "acc5", "mean_per_class_recall"]


def test_weight_decay_search_follows_clip_benchmark():
    tried = []

    def val_acc1(weight_decay):
        index = WEIGHT_DECAYS.index(weight_decay)
        tried.append(index)
        return 1 - abs(index - 37) / 100

    # decades: best 32; spans 8 [24 32 40] -> 40, 4 [36 40 44] -> 36, 2 [34 36 38] -> 36 (38
    # ties it and comes later), 1 [35 36 37] -> 37
    assert search_weight_decay(val_acc1) == 37
    assert tried == COARSE + [24, 40, 36, 44, 34, 38, 35, 37]  # each fit once


def clip_benchmark_order(n: int, classes: int, settings: ProbeSettings):
    """What CLIP_benchmark's procedure draws from one seeded generator: nn.Linear's uniform
    initialisation (weight, then bias, bound 1/sqrt(D) for D = n one-hot features) and then
    each epoch's shuffle of the n rows."""
    generator = torch.Generator().manual_seed(settings.seed)
    bound = n ** -0.5
    weight = torch.empty(classes, n).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(classes).uniform_(-bound, bound, generator=generator)
    orders = [torch.randperm(n, generator=generator) for _ in range(settings.epochs)]
    return weight, bias, orders


def test_the_probe_fit_follows_clip_benchmarks_procedure(monkeypatch):
    """10 one-hot rows, each its own class, in batches of 4 for 2 epochs: each epoch's seeded
    order in batches of 4, 4 and 2, the cosine learning rate from lr at step 0 over the 6 steps,
    and the weight decay asked for."""
    settings = ProbeSettings(lr=0.3, epochs=2, batch_size=4, seed=5)
    steps, batches = [], []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            steps.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
            return super().step(closure)

    cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits, targets):
        batches.append(targets.tolist())
        return cross_entropy(logits, targets)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_cross_entropy)
    train_probe(torch.eye(10), torch.arange(10), 10, 0.02, settings)
    _, _, orders = clip_benchmark_order(10, 10, settings)
    assert batches == [order[i:i + 4].tolist() for order in orders for i in (0, 4, 8)]
    cosine = [0.5 * (1 + math.cos(math.pi * step / 6)) * 0.3 for step in range(6)]
    assert steps == [(pytest.approx(lr, abs=1e-12), 0.02) for lr in cosine]


def test_the_probe_starts_from_the_seeded_nn_linear_initialisation():
    """At a learning rate too small to move a weight, the fitted layer is its initialisation."""
    settings = ProbeSettings(lr=1e-30, epochs=1, batch_size=4, seed=7)
    layer = train_probe(torch.eye(10), torch.arange(10) % 3, 3, 0.01, settings)
    weight, bias, _ = clip_benchmark_order(10, 3, settings)
    assert torch.equal(layer.weight.detach(), weight) and torch.equal(layer.bias.detach(), bias)
    assert not layer.training
    assert train_probe(torch.eye(10, device="meta"), torch.arange(10, device="meta") % 3, 3, 0.01,
                       settings).weight.device.type == "meta"  # fitted on the features' device


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"lr": -1.0}, {"epochs": 0}, {"batch_size": 0}])
def test_probe_settings_out_of_range_are_refused(bad):
    with pytest.raises(UserError) as refused:
        ProbeSettings(**bad)
    got = {"lr": 0.1, "epochs": 10, "batch_size": 64, "seed": 0, **bad}
    assert str(refused.value) == ("linear probe needs lr > 0, epochs >= 1 and batch_size >= 1, "
                                  f"got {got}")
    assert ProbeSettings(lr=1e-9, epochs=1, batch_size=1) == ProbeSettings(1e-9, 1, 1, 0)


def test_the_search_at_either_end_of_the_range_tries_only_indices_inside_it():
    for peak, refined in ((0, [8, 4, 2, 1]), (96, [88, 92, 94, 95])):
        tried = []

        def val_acc1(weight_decay):
            tried.append(WEIGHT_DECAYS.index(weight_decay))
            return 1 - abs(tried[-1] - peak) / 100

        assert search_weight_decay(val_acc1) == peak
        assert tried == COARSE + refined  # the end itself was tried among the decades


def test_the_probe_shows_its_fits_out_of_the_search_and_the_final_fit(capsys):
    """16 fits in all (15 at most in the search, then the final one), counted to the end even
    when the search needed fewer."""
    labels = torch.arange(12) % 3
    features = Features(torch.eye(3)[labels], labels, {})
    probe_metrics(features, features, features, 3, ProbeSettings(epochs=1))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("linear probe fits: 1/16 (6%) | ")
    assert lines[-1].startswith("linear probe fits: 16/16 (100%) | ")
    assert all(re.search(r" \| [\d.]+( fits/s|s/fit) \| ", line) for line in lines)


def test_probe_on_one_hot_features_is_exact():
    labels = torch.arange(60) % 6
    one_hot = Features(torch.eye(6)[labels], labels, {})
    test_labels = torch.tensor([5, 4, 3, 2, 1, 0, 0])
    test = Features(torch.eye(6)[test_labels], test_labels, {})
    metrics, weight_decay = probe_metrics(one_hot, one_hot, test, 6, ProbeSettings(epochs=3))
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert weight_decay in WEIGHT_DECAYS


def test_hold_out_takes_a_seeded_share_for_validation_and_keeps_the_skip_counts_in_train():
    labels = torch.arange(10)
    features = Features(labels[:, None].float(), labels, {"bad_image": 2})
    train, val = hold_out(features, 0.3, seed=0)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert (val.y.tolist(), train.y.tolist()) == (order[:3], order[3:])
    assert torch.equal(train.x[:, 0].long(), train.y) and torch.equal(val.x[:, 0].long(), val.y)
    assert (train.skipped, val.skipped) == ({"bad_image": 2}, {})
    assert hold_out(features, 0.3, seed=1)[1].y.tolist() != order[:3]
    assert len(hold_out(features, 0.01, seed=0)[1].y) == 1  # a share below one image is one


@pytest.mark.parametrize("proportion", [0, 1, 1.5, -0.25])
def test_a_val_proportion_outside_0_1_is_refused(proportion):
    features = Features(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long), {})
    with pytest.raises(UserError) as refused:
        hold_out(features, proportion, seed=0)
    assert str(refused.value) == f"val_proportion must be in (0, 1), got {proportion}"


def test_one_training_image_cannot_spare_a_validation_split():
    one = Features(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), {})
    with pytest.raises(UserError) as refused:
        hold_out(one, 0.5, seed=0)
    assert str(refused.value) == "1 training image(s) cannot spare a validation split"


def test_linear_probe_command(tiny, tokenizer_json, world_dir, tmp_path, capsys):
    from vlp.models.export import save_pretrained

    export = save_pretrained(tiny.model, tmp_path / "export", tokenizer_path=tokenizer_json)
    out = tmp_path / "probe.json"
    args = ["eval", "linear-probe", "--checkpoint", str(export), "--epochs", "2",
            "--dataset", str(dataset(world_dir, "colour", "imagefolder")), "--out", str(out)]
    assert vlp(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert (result["num_train"], result["num_val"], result["num_test"]) == (16, 8, 16)
    assert list(result["metrics"]) == KEYS and result["weight_decay"] in WEIGHT_DECAYS
    assert result["validation"].endswith("imagefolder/val")

    held_out = tmp_path / "no_val"
    shutil.copytree(dataset(world_dir, "colour", "imagefolder"), held_out)
    shutil.rmtree(held_out / "val")
    assert vlp([*args[:-4], "--dataset", str(held_out), "--val-proportion", "0.25"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_train"], result["num_val"]) == (12, 4)
    assert result["validation"] == f"0.25 of {held_out / 'train'}"

    assert vlp([*args[:-4], "--dataset", str(held_out), "--lr", "0"]) == 2
    assert "error: lr must be > 0, got 0.0" in capsys.readouterr().err


def test_a_probe_loads_onto_the_device_encodes_as_asked_and_fits_where_the_model_runs(
        tiny, world_dir, monkeypatch):
    """Spies: the checkpoint loader (a path is loaded onto `device`, the CPU by default; a loaded
    model is used as it is), bf16 autocast, the model's device (meta here) and the fit."""
    from vlp.pipeline.eval.classification import probe

    loads, casts = spy_loading_and_autocast(monkeypatch, probe, tiny)
    fits = []

    def fit(train, val, test, num_classes, settings):
        fits.append({name: (f.x.device.type, f.y.device.type, f.skipped)
                     for name, f in (("train", train), ("val", val), ("test", test))})
        return {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}, 0.01

    monkeypatch.setattr(probe, "model_device", lambda model: torch.device("meta"))
    monkeypatch.setattr(probe, "probe_metrics", fit)
    clock = iter([10.0, 11.23456, 20.0, 21.0, 30.0, 31.0])
    monkeypatch.setattr(probe, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    config = LinearProbeConfig(dataset=dataset(world_dir, "colour", "imagefolder"), bf16=True)
    result = evaluate_linear_probe("runs/tiny", config, device="cuda:3")
    evaluate_linear_probe("runs/tiny", config)
    evaluate_linear_probe(tiny, config)
    assert loads == [("runs/tiny", "cuda:3"), ("runs/tiny", "cpu")]
    assert set(casts) == {True}
    assert fits == [dict.fromkeys(["train", "val", "test"], ("meta", "meta", {}))] * 3
    assert (result["task"], result["weight_decay"]) == ("linear_probe", 0.01)
    assert result["metrics"] == {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}
    assert result["baselines"] == {"chance": chance_metrics(7)} and result["skipped"] == {}
    assert result["seconds"] == 1.235  # rounded to the millisecond


def test_splits_with_different_classes_are_refused_before_a_model_loads(world_dir, tmp_path):
    folders = tmp_path / "colour"
    shutil.copytree(dataset(world_dir, "colour", "imagefolder"), folders)
    shutil.rmtree(folders / "train" / "red")
    with pytest.raises(UserError) as refused:
        evaluate_linear_probe("no/checkpoint/here", LinearProbeConfig(dataset=folders))
    assert str(refused.value) == (f"{folders / 'train'} and {folders / 'test'} have different "
                                  "classes; every split must have the same class list")


def test_a_probe_reads_every_split_with_the_class_names_file_and_fits_with_its_settings(
        tiny, tokenizer_json, world_dir, tmp_path):
    """A checkpoint path loads onto the CPU by default; a class-names file names the classes of
    every split (the folders are named otherwise); the settings reach the fit."""
    from vlp.models.export import save_pretrained

    export = save_pretrained(tiny.model, tmp_path / "export", tokenizer_path=tokenizer_json)
    folders = dataset(world_dir, "colour", "imagefolder")
    names = tmp_path / "classnames.txt"
    names.write_text("".join(f"{c.name.upper()}\n" for c in sorted((folders / "test").iterdir())))
    config = LinearProbeConfig(dataset=folders, classnames=names, epochs=1, lr=0.5,
                               probe_batch_size=8, seed=3)
    result = evaluate_linear_probe(export, config)
    assert result["settings"] == {"lr": 0.5, "epochs": 1, "batch_size": 8, "seed": 3}
    assert result["num_classes"] == 7 and result["model"] == str(export)
