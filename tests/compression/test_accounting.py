"""profile(): params, size_bytes and MACs equal hand-computed values for a small network."""

from __future__ import annotations

import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, profile


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),  # "0": 3x8x8 -> 8x8x8
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # "3": -> 16x4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),  # "6"
    )


def test_fp32_network_by_hand():
    prof = profile(small_net(), (3, 8, 8))
    assert prof.layers["0"].params == 8 * 27 + 8
    assert prof.layers["0"].macs == (8 * 8 * 8) * (3 * 3 * 3)
    assert prof.layers["3"].macs == (16 * 4 * 4) * (8 * 3 * 3)
    assert prof.layers["6"].macs == 16 * 10
    assert prof.layers["1"].params == 16 and prof.layers["1"].macs == 0
    assert prof.params == 224 + 16 + 1152 + 170
    assert prof.size_bytes == 4 * prof.params
    assert prof.macs == 13824 + 18432 + 160


def test_compressed_mixed_precision_network_by_hand():
    model = small_net()
    plan = Plan({"0": LayerPlan("none", None, "int4"),
                 "3": LayerPlan("tucker2", [4, 6], "int8"),
                 "6": LayerPlan("none", None, "fp16")}, activations="int8")
    compressed = compress(model, plan, calibration=[torch.randn(4, 3, 8, 8)])
    prof = profile(compressed, (3, 8, 8))
    layers = prof.layers
    # conv "0" at int4 behind an activation quantizer: 216 weights at 4 bits + 8 fp32 scales, fp32 bias
    assert layers["0.1"].size_bytes == 108 + 8 * 4 + 8 * 4 and layers["0.1"].precision == "int4"
    assert layers["0.0"].size_bytes == 5  # activation scale (fp32) + zero point (int8)
    # Tucker-2 chain 8 -> 4 -> 6 -> 16 at int8 (activation quantizers at "3.0", "3.2", "3.4"); its output
    # feeds a float avgpool, so it gets an output quantizer "3.6" too (ONNX Runtime's QLinearConv needs one)
    assert layers["3.6"].size_bytes == 5 and layers["3.6"].kind == "ActivationFakeQuant"
    assert layers["3.1"].size_bytes == 32 + 4 * 4 and layers["3.1"].macs == (4 * 8 * 8) * 8
    assert layers["3.3"].size_bytes == 216 + 6 * 4 and layers["3.3"].macs == (6 * 4 * 4) * (4 * 9)
    assert layers["3.5"].size_bytes == 96 + 16 * 4 and layers["3.5"].macs == (16 * 4 * 4) * 6
    # linear at fp16, weight and bias
    assert layers["6"].size_bytes == (160 + 10) * 2 and layers["6"].precision == "fp16"
    assert prof.params == 224 + 16 + (32 + 216 + 96) + 170 == sum(p.numel() for p in compressed.parameters())
    assert prof.size_bytes == (172 + 5) + 64 + (48 + 240 + 160 + 4 * 5) + 340
    assert prof.macs == 13824 + 2048 + 3456 + 1536 + 160


def test_profile_leaves_the_model_untouched():
    model = small_net()
    compressed = compress(model, Plan({"3": LayerPlan("none", None, "int8")}, activations="int8"))
    quantizer = compressed.get_submodule("3.0")
    assert not quantizer.calibrated
    compressed.train()
    profile(compressed, (3, 8, 8))
    assert not quantizer.calibrated and compressed.training  # the dummy input did not set ranges
