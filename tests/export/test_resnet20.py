"""The real adapted ResNet-20 from ../shared, compressed and exported to int8 ONNX.

Tucker-2 + int8: what ONNX Runtime computes is what the quantization-aware PyTorch model computed.
CP + int8: the research's finding measured end to end — stabilised CP survives int8, plain CP not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, make_plan
from autorank.export import export_model, onnx_accuracy, write_onnx
from autorank.models import create_model
from conftest import CIFAR_MODELS

WEIGHTS = CIFAR_MODELS / "resnet20-12fca82f-jpeg-adapted.pt"
TEST_IMAGES = 2000


@pytest.fixture(scope="module")
def resnet20(cifar) -> nn.Module:
    return create_model("resnet20", cifar, WEIGHTS).eval()


def _calibration(cifar, images: int = 512) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [x for x, _ in cifar.batches("train", 128, shuffle=True, generator=generator, limit=images)]


def test_tucker2_evbmf_int8_onnx_matches_the_quantization_aware_model(resnet20, cifar, tmp_path):
    # EVBMF ranks weakened with w = 0.2 (MUSCO): usable without fine-tuning (docs/COMPRESSION.md)
    plan = make_plan(resnet20, "tucker2", "vbmf:0.2", "int8", activations="int8")
    model = compress(resnet20, plan, calibration=_calibration(cifar), n_iter_max=10).eval()
    result = export_model(model, cifar, tmp_path / "tucker.onnx", "int8", verify_limit=TEST_IMAGES, bench=False)
    v = result.verification
    print(f"Tucker-2 int8: ONNX {v.onnx_accuracy:.4f}, PyTorch {v.torch_accuracy:.4f}, agreement "
          f"{v.top1_agreement:.4f}, max |diff| {v.max_abs_error:.3g}; file {result.file_bytes} B, tensors "
          f"{result.payload_bytes} B, computed {result.size_bytes} B")
    assert v.images == TEST_IMAGES
    assert v.torch_accuracy > 0.7  # a working model, not a broken one that agrees by chance
    assert abs(v.onnx_accuracy - v.torch_accuracy) <= 0.005
    # 0.9815 before the PyTorch reference simulated the file's int32 biases (docs/EXPORT.md)
    assert v.top1_agreement >= 0.99
    assert result.payload_bytes == pytest.approx(result.size_bytes, rel=0.10)
    assert result.file_bytes == pytest.approx(result.size_bytes, rel=0.10)


CP_LAYERS = tuple(f"layer{stage}.{block}.conv{conv}" for stage in (2, 3) for block in range(3) for conv in (1, 2))


@pytest.mark.parametrize("stabilize, max_loss, min_loss", [("epc", 0.01, None), ("none", None, 0.10)])
def test_cp_int8_needs_stabilisation(resnet20, cifar, tmp_path, stabilize, max_loss, min_loss):
    plan = Plan({name: LayerPlan("cp", 0.6, "int8", stabilize=stabilize) for name in CP_LAYERS},
                activations="int8")
    model = compress(resnet20, plan, calibration=_calibration(cifar), n_iter_max=20).eval()
    write_onnx(model, cifar, tmp_path / "cp32.onnx", "fp32")
    write_onnx(model, cifar, tmp_path / "cp8.onnx", "int8")
    fp32 = onnx_accuracy(tmp_path / "cp32.onnx", cifar, "test", limit=TEST_IMAGES)
    int8 = onnx_accuracy(tmp_path / "cp8.onnx", cifar, "test", limit=TEST_IMAGES)
    print(f"CP ({stabilize}): fp32 ONNX {fp32:.4f}, int8 ONNX {int8:.4f}, loss {(fp32 - int8) * 100:.2f} points")
    assert fp32 > 0.45  # far above chance (0.10): a working model before int8
    if max_loss is not None:
        assert fp32 - int8 <= max_loss
    if min_loss is not None:
        assert fp32 - int8 >= min_loss
