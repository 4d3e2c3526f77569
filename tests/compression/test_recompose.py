"""LayerPlan.run: a decomposed layer stored as its factors but run as one op of the layer's geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress
from autorank.compression.methods import Recomposed, decompose_layer, recomposed
from autorank.compression.quantize import ActivationFakeQuant
from autorank.errors import AutorankError


@pytest.mark.parametrize("layer, method, ranks", [
    (nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=True), "tucker2", (6, 7)),
    (nn.Conv2d(12, 20, 3, padding="same"), "cp", (9,)),
    (nn.Conv2d(12, 20, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), "tt", (6, 10, 8)),
    (nn.Linear(30, 20), "svd", (7,)),
])
def test_a_chain_recomposes_exactly_into_one_layer_of_the_original_geometry(layer, method, ranks):
    chain = decompose_layer(layer, method, ranks).double()
    one = recomposed(chain, method).double()
    x = torch.randn(3, 12, 15, 15, dtype=torch.double) if isinstance(layer, nn.Conv2d) else \
        torch.randn(5, 30, dtype=torch.double)
    assert type(one) is type(layer) and one.weight.shape == layer.weight.shape
    if isinstance(layer, nn.Conv2d):
        assert (one.stride, one.dilation) == (layer.stride, layer.dilation)
    assert torch.allclose(one(x), chain(x), atol=1e-12, rtol=0)


def test_run_is_checked_serialised_and_optional_in_plan_json():
    with pytest.raises(AutorankError, match="run 'fast': choose from chain, recomposed"):
        LayerPlan("tucker2", [2, 2], run="fast")
    with pytest.raises(AutorankError, match="needs a decomposition method"):
        LayerPlan("none", None, "int8", run="recomposed")
    plan = Plan({"a": LayerPlan("cp", [4], "int8", run="recomposed"), "b": LayerPlan("tucker2", [2, 3])}, "int8")
    text = plan.to_json()
    assert '"run": "recomposed"' in text and text.count('"run"') == 1  # chain, the default, is left out
    assert Plan.from_json(text) == plan
    old = '{"layers": {"b": {"method": "tucker2", "rank": [2, 3], "precision": "fp32", "stabilize": "epc"}}}'
    assert Plan.from_json(old).layers["b"].run == "chain"


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24),
                         nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 10)).eval()


def test_a_recomposed_int8_chain_rounds_only_its_input_and_gets_no_output_quantizer():
    model = _cnn()
    x = torch.randn(8, 3, 12, 12)

    def compressed(run: str, decompose: bool = True) -> nn.Module:
        plan = Plan({name: LayerPlan("tucker2", [6, 8], "int8", run=run) for name in ("2", "5")}, activations="int8")
        return compress(model, plan, calibration=[x], decompose=decompose).eval()

    def output_quantizers(net: nn.Module) -> list[str]:
        return [m.output_of for m in net.modules() if isinstance(m, ActivationFakeQuant) and m.output_of]

    chain, one = compressed("chain"), compressed("recomposed")
    layer = one.get_submodule("2")
    assert isinstance(layer, Recomposed) and layer.method == "tucker2"
    assert [isinstance(m, ActivationFakeQuant) for m in layer] == [True, False, False, False]
    assert sum(isinstance(m, ActivationFakeQuant) for m in chain.get_submodule("2").modules()) == 3
    # "5" feeds a float pooling: as a chain its int8 output is rounded (for QLinearConv), recomposed it is float
    assert output_quantizers(chain) == ["5"] and output_quantizers(one) == []
    again = compressed("recomposed", decompose=False)  # the structure from the plan alone takes the weights
    again.load_state_dict(one.state_dict())
    assert torch.equal(again.eval()(x), one(x))


def test_recomposed_needs_zero_padding():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(AutorankError, match="needs zero padding"):
        compress(model, Plan({"0": LayerPlan("tucker2", [2, 4], run="recomposed")}))
