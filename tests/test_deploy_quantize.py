"""int8 exports: the Int8Linear kernels on inputs with known answers, and `vlp deploy quantize`
writing an export that load_model and the retrieval eval load unchanged."""
import json
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from deploy_helpers import write_tiny_export

from vlp.models.quantize import Int8Linear, quantize_layers, quantize_weight
from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.checkpoints import CheckpointError
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.eval.configs import RetrievalConfig
from vlp.pipeline.eval.retrieval.job import evaluate_retrieval


def representable_linear(out_features=6, in_features=10, seed=0) -> torch.nn.Linear:
    """A Linear layer whose weights are exactly int8 * scale, with each row reaching 127 and
    power-of-two scales (so max|row| / 127 gives the scale back without rounding)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_features, in_features), generator=generator)
    q[:, 0] = 127
    scale = 2.0 ** -torch.randint(3, 9, (out_features,), generator=generator).float()
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(q.float() * scale[:, None])
        linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear


def test_quantize_weight_recovers_representable_weights_exactly():
    linear = representable_linear()
    q, scale = quantize_weight(linear.weight)
    assert q.dtype == torch.int8 and int(q[:, 0].min()) == 127
    assert torch.equal(q.float() * scale[:, None], linear.weight.detach())
    zero_row = quantize_weight(torch.zeros(2, 3))  # a pruned row stays zero, with scale 1
    assert torch.equal(zero_row[0], torch.zeros(2, 3, dtype=torch.int8))
    assert torch.equal(zero_row[1], torch.ones(2))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8_linear_equals_the_float_layer_on_representable_inputs(mode):
    # Weights are int8 * scale and the inputs integers in [0, 127] (7-bit activations with
    # scale 1): the int8 GEMM accumulates exactly, so only fp32 rounding separates the two.
    linear = representable_linear()
    layer = Int8Linear.from_linear(linear, mode)
    x = torch.randint(0, 128, (3, 4, 10)).float()
    x[0, 0, 0] = 127  # the activation range is [0, 127] exactly
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-4)


def test_dynamic_int8_runs_the_int8_kernel_and_weight_only_does_not():
    # Inputs off the 7-bit grid: the dynamic layer rounds them, the weight-only one does not.
    linear = representable_linear()
    x = torch.linspace(-3, 3, 40).reshape(4, 10)
    with torch.no_grad():
        exact = F.linear(x, linear.weight, linear.bias)
        weight_only = Int8Linear.from_linear(linear, "weight_only")(x)
        dynamic = Int8Linear.from_linear(linear, "dynamic")(x)
    torch.testing.assert_close(weight_only, exact, rtol=1e-6, atol=1e-5)
    assert (dynamic - exact).abs().max() > 1e-4
    # ...and trains through the dequantized weights when the input needs a gradient.
    x.requires_grad_(True)
    Int8Linear.from_linear(linear, "dynamic")(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(4, 10))


def test_quantize_command_writes_an_export_every_eval_loads(tmp_path, world_dir):
    fp32 = write_tiny_export(world_dir, tmp_path / "fp32")
    out = tmp_path / "int8"
    assert vlp(["deploy", "quantize", "--checkpoint", str(fp32), "--out", str(out)]) == 0

    layers = json.loads((out / "config.json").read_text())["quantization"]["layers"]
    assert layers["blocks.0.attn.qkv"] == "dynamic" and layers["text_proj"] == "dynamic"
    assert layers["blocks.1.ffn_vl.fc1"] == "weight_only"  # the fusion layer (TINY: depth 2)
    assert "itm_head" not in layers and "mlm_head.dense" not in layers
    loaded = load_model(out)
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, Int8Linear)} == set(layers)
    size = {p: (p / "model.safetensors").stat().st_size for p in (fp32, out)}
    assert size[out] < 0.6 * size[fp32]

    # The export holds exactly the weights an in-memory conversion gives.
    reference = quantize_layers(load_model(fp32).model, layers)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images))

    result = evaluate_retrieval(
        out,
        RetrievalConfig(
            karpathy_json=world_dir / "retrieval/dataset_synth.json",
            image_root=world_dir / "retrieval",
            rerank_k=2,
        ),
    )
    assert result["num_images"] == 32 and result["model"] == str(out)


def test_unknown_quantization_scheme_is_a_clear_error(tmp_path, world_dir):
    out = write_tiny_export(world_dir, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"scheme": "int4-groupwise", "layers": {}}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="int4-groupwise"):
        load_model(out)


def test_a_dynamic_layer_repacks_when_a_fine_tune_changes_its_bias_or_weight():
    linear = representable_linear()
    layer = Int8Linear.from_linear(linear, "dynamic")
    x = torch.randint(0, 128, (2, 10)).float()
    with torch.no_grad():
        before = layer(x)
        layer.bias.add_(1.0)  # as an optimizer step updates it in place
        torch.testing.assert_close(layer(x), before + 1.0)
        layer.bias = torch.nn.Parameter(layer.bias + 1.0)  # a new tensor, as a load may bring
        torch.testing.assert_close(layer(x), before + 2.0)
        layer.weight.zero_()
        torch.testing.assert_close(layer(x), layer.bias.expand(2, 6))


def test_the_packed_weight_is_per_output_channel_and_a_copy_rebuilds_it():
    layer = Int8Linear.from_linear(representable_linear(), "dynamic")
    x = torch.randint(0, 128, (2, 10)).float()
    with torch.no_grad():
        out = layer(x)
        qweight, bias = torch.ops.quantized.linear_unpack(layer._packed_weight())
        assert qweight.q_per_channel_axis() == 0
        assert torch.equal(qweight.dequantize(), layer.dequantized_weight())
        copy = deepcopy(layer)
        assert copy._packed is None and layer._packed is not None
        torch.testing.assert_close(copy(x), out)


def test_the_int8_kernel_runs_with_gradients_enabled_for_an_input_that_needs_none():
    """Evaluation outside no_grad: only an input that needs a gradient (a fine-tune of the
    backbone) takes the dequantized path."""
    linear = representable_linear()
    x = torch.linspace(-3, 3, 40).reshape(4, 10)
    dynamic = Int8Linear.from_linear(linear, "dynamic")
    with torch.no_grad():
        kernel = dynamic(x)
    assert torch.is_grad_enabled() and torch.equal(dynamic(x), kernel)


def test_weight_only_computes_in_the_inputs_dtype():
    layer = Int8Linear.from_linear(representable_linear(), "weight_only")
    x = torch.randint(0, 128, (2, 10)).to(torch.bfloat16)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16


def test_a_layer_without_bias_stays_without_one():
    layer = Int8Linear.from_linear(torch.nn.Linear(4, 3, bias=False), "dynamic")
    assert layer.bias is None and set(layer.state_dict()) == {"weight", "weight_scale"}
    assert repr(layer) == "Int8Linear(in_features=4, out_features=3, bias=False, mode=dynamic)"
    with torch.no_grad():
        assert layer(torch.ones(2, 4)).shape == (2, 3)


def test_bad_int8_layers_and_records_are_one_exact_line():
    from vlp.models.quantize import apply_quantization_record

    with pytest.raises(ValueError) as refused:
        Int8Linear(4, 3, True, "int4")
    assert str(refused.value) == "int8 mode 'int4' is not one of ('dynamic', 'weight_only')"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError) as refused:
        quantize_layers(model, {"1": "dynamic"})
    assert str(refused.value) == "1 is a ReLU, not an nn.Linear"
    scheme = "int8-per-channel-symmetric"
    for layers in (["0"], {"0": "int4"}):
        with pytest.raises(ValueError) as refused:
            apply_quantization_record(model, {"scheme": scheme, "layers": layers})
        assert str(refused.value) == ("quantization layers must map layer names to one of "
                                      "('dynamic', 'weight_only')")
    for name in ("1", "2"):
        with pytest.raises(ValueError) as refused:
            apply_quantization_record(model, {"scheme": scheme, "layers": {name: "dynamic"}})
        assert str(refused.value) == f"quantized layer {name!r} is not a Linear layer of this model"
