"""compress(): where int8 convs get output quantizers, and loading weights saved before they existed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, load_compressed
from autorank.compression.quantize import ActivationFakeQuant


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # "3": feeds a float avgpool
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


PLAN = Plan({"3": LayerPlan("tucker2", [4, 6], "int8"), "6": LayerPlan("none", None, "int8")}, activations="int8")


def output_quantizers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ActivationFakeQuant) and m.output_of]


def test_an_int8_conv_read_by_a_float_layer_gets_an_output_quantizer():
    compressed = compress(small_net(), PLAN, calibration=[torch.randn(8, 3, 8, 8)])
    assert output_quantizers(compressed) == ["3.6"]
    assert output_quantizers(compress(small_net(), PLAN, output_quant=False)) == []


def test_a_conv_that_is_the_models_output_keeps_a_float_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    plan = Plan({"0": LayerPlan("none", None, "int8"), "2": LayerPlan("none", None, "int8")}, activations="int8")
    assert output_quantizers(compress(model, plan)) == []  # the file has no QuantizeLinear after a graph output


@pytest.mark.parametrize("saved_with_output_quant", [True, False])
def test_saved_weights_load_into_the_structure_they_were_trained_in(saved_with_output_quant):
    model, x = small_net(), torch.randn(8, 3, 8, 8)
    saved = compress(model, PLAN, calibration=[x], output_quant=saved_with_output_quant).eval()
    with torch.no_grad():
        saved.get_submodule("3.1").weight.mul_(1.5)  # weights the plan alone would not give
        expected = saved(x)
    loaded = load_compressed(model, PLAN, saved.state_dict()).eval()
    assert bool(output_quantizers(loaded)) == saved_with_output_quant
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_weights_of_another_plan_are_refused():
    model = small_net()
    other = compress(model, Plan({"3": LayerPlan("tucker2", [2, 3], "int8")}, activations="int8"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_compressed(model, PLAN, other.state_dict())
