"""Magnitude pruning: masks on weights with known answers, masked training keeping zeros, and
`vlp deploy prune` with a recovery fine-tune through the real deepspeed launcher."""
import json

import pytest
import torch
from deploy_helpers import data_overrides, write_tiny_export

from vlp.models.sparsity import (
    MaskedLinear,
    keep_zeros,
    magnitude_masks,
    pruning_record,
    zero_fraction,
    zero_masks,
)
from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.distributed import free_port

WEIGHTS = {"a": torch.tensor([[1.0, -2.0], [3.0, -4.0]]),
           "b": torch.tensor([[0.5, 5.0], [6.0, -0.1]])}


def test_global_masks_drop_the_smallest_magnitudes_over_all_layers():
    masks = magnitude_masks(WEIGHTS, 0.5, "global")  # the 4 smallest |w|: 0.1, 0.5, 1, 2
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True], [True, False]]


def test_layer_masks_drop_the_smallest_magnitudes_of_each_layer():
    masks = magnitude_masks(WEIGHTS, 0.25, "layer")  # one of four per layer: 1 in a, 0.1 in b
    assert masks["a"].tolist() == [[False, True], [True, True]]
    assert masks["b"].tolist() == [[True, True], [True, False]]


def test_masked_weights_get_no_gradient_and_adamw_keeps_them_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        model[0].weight.mul_(mask)
    keep_zeros(model, {"0": mask})
    assert isinstance(model[0], MaskedLinear) and list(model.state_dict()) == ["0.weight", "0.bias"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        assert torch.equal(model[0].weight.grad[~mask], torch.zeros(int((~mask).sum())))
        optimizer.step()
    assert torch.equal(model[0].weight.detach()[~mask], torch.zeros(int((~mask).sum())))
    assert bool((model[0].weight.detach()[mask] != 0).all())


def test_prune_command_writes_exact_sparsity_into_the_export(tmp_path, world_dir):
    source = write_tiny_export(world_dir, tmp_path / "fp32")
    out = tmp_path / "pruned"
    assert vlp(["deploy", "prune", "--checkpoint", str(source), "--out", str(out),
                "--sparsity", "0.5", "--scope", "layer"]) == 0
    record = json.loads((out / "config.json").read_text())["pruning"]
    assert record["scope"] == "layer" and record["target_sparsity"] == 0.5
    model = load_model(out).model
    assert pruning_record(model) == record
    for name in record["layers"]:  # no ties in random weights: exactly half of each layer
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(weight.numel() / 2), name
    assert zero_fraction(model, record["layers"]) == record["sparsity"] == 0.5


@pytest.mark.slow
def test_recovery_fine_tune_keeps_every_zero_under_zero3(tmp_path, world_dir, shard_dir):
    source = write_tiny_export(world_dir, tmp_path / "fp32")
    out = tmp_path / "recovered"
    overrides = data_overrides(shard_dir)
    code = vlp(["deploy", "prune", "--checkpoint", str(source), "--out", str(out),
                "--sparsity", "0.5", "--recover-steps", "3", "--nproc", "2",
                "--master-port", str(free_port()),
                "--set", *overrides, "optim.lr=1e-2", "checkpoint.every_steps=3"])
    assert code == 0
    pruned, recovered = load_model(tmp_path / "recovered.pruned").model, load_model(out).model
    assert pruning_record(recovered)["layers"] == pruning_record(pruned)["layers"]
    changed = 0
    for name, kept in zero_masks(pruned).items():
        weight = recovered.get_submodule(name).weight.detach()
        assert torch.equal(weight[~kept], torch.zeros(int((~kept).sum()))), name
        changed += int((weight[kept] != pruned.get_submodule(name).weight.detach()[kept]).sum())
    assert changed > 0  # the fine-tune did train the kept weights
    run = json.loads((tmp_path / "recovered.recovery" / "train_config.json").read_text())
    assert run["model"]["init_from"] == str(tmp_path / "recovered.pruned")
    assert run["optim"]["max_steps"] == 3
