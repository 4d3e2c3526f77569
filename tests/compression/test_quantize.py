"""Fake quantization: the integer grid, straight-through gradients, calibration, stripping for export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autorank.compression import calibrate, layer_precisions, strip_fake_quant
from autorank.compression.quantize import ActivationFakeQuant, quantize_weight, weight_precision
from autorank.compression.quantize import quantize_weights_
from autorank.errors import AutorankError


@pytest.mark.parametrize("precision,qmax", [("int8", 64), ("int4", 7)])
def test_integer_weights_lie_on_a_per_channel_symmetric_grid(precision, qmax):
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-3, 1, 6).view(6, 1, 1, 1)
    q = quantize_weight(w, precision)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / qmax
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= qmax + 1e-3
    assert ((q - w).abs() <= scale / 2 + 1e-7).all()  # round-to-nearest per output channel
    assert torch.equal(q.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)))  # extremes exact


def test_fp16_rounds_like_half():
    w = torch.randn(50) * 1e3
    assert torch.equal(quantize_weight(w, "fp16"), w.half().float())


def test_weight_fake_quant_passes_gradients_straight_through():
    conv = nn.Conv2d(3, 4, 3)
    reference = nn.Conv2d(3, 4, 3)
    reference.load_state_dict(conv.state_dict())
    quantize_weights_(conv, "int4")
    x = torch.randn(2, 3, 8, 8)
    conv(x).square().sum().backward()
    with torch.no_grad():
        reference.weight.copy_(quantize_weight(reference.weight, "int4"))
    reference(x).square().sum().backward()
    original = conv.parametrizations.weight.original
    assert torch.allclose(original.grad, reference.weight.grad, atol=1e-5)
    assert weight_precision(conv) == "int4" and weight_precision(reference) == "fp32"
    with pytest.raises(AutorankError):
        quantize_weights_(nn.Linear(2, 2), "int3")


def test_activation_calibration_minmax_and_percentile():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 8, generator=g) for _ in range(3)]
    batches[1][0, 0] = 40.0  # one outlier
    q = ActivationFakeQuant()
    model = nn.Sequential(q, nn.Linear(8, 2))
    calibrate(model, batches, observer="minmax")
    assert q.max_val.item() == 40.0
    assert q.min_val.item() == pytest.approx(min(b.min().item() for b in batches))
    calibrate(model, batches, observer="percentile", percentile=99.0)
    assert q.max_val.item() < 5.0  # the outlier is ignored
    with pytest.raises(AutorankError):
        calibrate(model, batches, observer="mse")


def test_activation_fake_quant_rounds_inside_and_clips_outside():
    q = ActivationFakeQuant()
    calibrate(nn.Sequential(q), [torch.linspace(-1.0, 3.0, 100)])
    q.eval()  # fixed range (training mode would keep tracking it)
    scale, zero_point = q.qparams()
    assert scale.item() == pytest.approx(4.0 / 255)
    x = torch.tensor([-2.0, -0.5, 0.0, 1.234, 5.0], requires_grad=True)
    y = q(x)
    assert y[2].item() == 0.0  # zero is exact
    assert abs(y[3].item() - 1.234) <= scale.item() / 2 + 1e-6
    assert y[0].item() == pytest.approx(-1.0, abs=scale.item()) and y[4].item() == pytest.approx(3.0, abs=scale.item())
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped straight-through estimator


def test_uncalibrated_quantizer_takes_the_first_batch_then_tracks_in_training():
    q = ActivationFakeQuant(momentum=0.5)
    q.train()
    q(torch.tensor([0.0, 2.0]))
    assert (q.min_val.item(), q.max_val.item()) == (0.0, 2.0)
    q(torch.tensor([0.0, 4.0]))
    assert q.max_val.item() == pytest.approx(3.0)


def test_strip_fake_quant_bakes_weights_and_keeps_the_original_working():
    model = nn.Sequential(ActivationFakeQuant(), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    quantize_weights_(model[1], "int8")
    quantize_weights_(model[3], "fp16")
    x = torch.randn(2, 3, 8, 8)
    calibrate(model, [x])
    model.eval()
    plain = strip_fake_quant(model)
    assert type(plain[1]) is nn.Conv2d and type(plain[3]) is nn.Linear and isinstance(plain[0], nn.Identity)
    assert set(plain.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert torch.equal(plain[1].weight, quantize_weight(model[1].parametrizations.weight.original, "int8"))
    assert layer_precisions(model) == {"1": "int8", "3": "fp16"}
    assert layer_precisions(plain) == {"1": "fp32", "3": "fp32"}
    with torch.no_grad():  # the original still runs (parametrized classes are shared by deep copies)
        quantized_input = model[0](x)
        assert torch.allclose(plain(quantized_input), model(x), atol=1e-5)
