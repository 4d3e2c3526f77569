"""The real adapted ResNet-20 from ../shared, compressed and exported to int8 ONNX.

Tucker-2 + int8: what ONNX Runtime computes is what the quantization-aware PyTorch model computed.
CP + int8: the research's finding measured end to end — stabilised CP survives int8, plain CP not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, make_plan
from autorank.export import ExportResult, export_model
from autorank.export.api import write_onnx
from autorank.engine.deploy import onnx_session
from autorank.export.verify import onnx_accuracy
from autorank.engine.deploy import INPUT_NAME
from autorank.export.verify import sample_batches
from autorank.models import create_model
from tests.conftest import CIFAR_MODELS
from emulation import needs_qemu, run_on_avx2

WEIGHTS = CIFAR_MODELS / "resnet20-12fca82f-jpeg-adapted.pt"
TEST_IMAGES = 2000
EMULATED_IMAGES = 300  # ~1 minute under QEMU


@pytest.fixture(scope="module")
def resnet20(cifar) -> nn.Module:
    return create_model("resnet20", cifar, WEIGHTS).eval()


def _calibration(cifar, images: int = 512) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [x for x, _ in cifar.batches("train", 128, shuffle=True, generator=generator, limit=images)]


@pytest.fixture(scope="module")
def tucker2_int8(resnet20, cifar, tmp_path_factory) -> ExportResult:
    """EVBMF ranks weakened with w = 0.2 (MUSCO): usable without fine-tuning (docs/COMPRESSION.md)."""
    plan = make_plan(resnet20, "tucker2", "vbmf:0.2", "int8", activations="int8")
    model = compress(resnet20, plan, calibration=_calibration(cifar), n_iter_max=10).eval()
    path = tmp_path_factory.mktemp("tucker2") / "tucker.onnx"
    return export_model(model, cifar, path, "int8", verify_limit=TEST_IMAGES, bench=False)


def test_tucker2_evbmf_int8_onnx_matches_the_quantization_aware_model(tucker2_int8):
    result = tucker2_int8
    v = result.verification
    print(f"Tucker-2 int8: ONNX {v.onnx_accuracy:.4f}, PyTorch {v.torch_accuracy:.4f}, agreement "
          f"{v.top1_agreement:.4f}, max |diff| {v.max_abs_error:.3g}; file {result.file_bytes} B, tensors "
          f"{result.payload_bytes} B, computed {result.size_bytes} B; host kernel {result.host['int8_kernel']}")
    assert v.images == TEST_IMAGES
    assert v.torch_accuracy > 0.7  # a working model, not a broken one that agrees by chance
    assert abs(v.onnx_accuracy - v.torch_accuracy) <= 0.005
    # 0.9815 before the PyTorch reference simulated the file's int32 biases (docs/EXPORT.md); 0.9115 on an
    # AVX2 host without VNNI before int8 weights moved to [-64, 64] (test_host.py)
    assert v.top1_agreement >= 0.99
    assert result.payload_bytes == pytest.approx(result.size_bytes, rel=0.10)
    assert result.file_bytes == pytest.approx(result.size_bytes, rel=0.10)


@needs_qemu
def test_tucker2_int8_file_computes_the_same_on_an_avx2_cpu_without_vnni(tucker2_int8, cifar, tmp_path):
    """The verified file on this host and on an emulated AVX2 CPU (VPMADDUBSW): the same logits."""
    images = torch.cat([x for x, _ in sample_batches(cifar, "test", limit=EMULATED_IMAGES, seed=0)]).numpy()
    np.save(tmp_path / "images.npy", images)
    path = tucker2_int8.path
    here = onnx_session(path, 1).run(None, {INPUT_NAME: images})[0]
    there = np.asarray(run_on_avx2(
        "import json, numpy as np; from autorank.engine.deploy import INPUT_NAME, onnx_session; "
        f"x = np.load({str(tmp_path / 'images.npy')!r}); "
        f"y = onnx_session({str(path)!r}, 1).run(None, {{INPUT_NAME: x}})[0]; print(json.dumps(y.tolist()))"),
        np.float32)
    agreement = (there.argmax(1) == here.argmax(1)).mean()
    print(f"emulated AVX2 vs this host: top-1 agreement {agreement:.4f}, max |diff| {np.abs(there - here).max():.3g}")
    assert agreement >= 0.995
    assert np.abs(there - here).max() < 1e-2  # measured 0 (5.5 with full-range int8 weights)


CP_LAYERS = tuple(f"layer{stage}.{block}.conv{conv}" for stage in (2, 3) for block in range(3) for conv in (1, 2))


@pytest.mark.parametrize("stabilize, max_loss, min_loss", [("epc", 0.01, None), ("none", None, 0.10)])
def test_cp_int8_needs_stabilisation(resnet20, cifar, tmp_path, stabilize, max_loss, min_loss):
    """The same CP factors as a float model and as an int8 file (int8 weights and activations)."""
    factors: dict = {}  # one decomposition for both models

    def plan(precision: str) -> Plan:
        return Plan({name: LayerPlan("cp", 0.6, precision, stabilize=stabilize) for name in CP_LAYERS},
                    activations="fp32" if precision == "fp32" else "int8")

    float_model = compress(resnet20, plan("fp32"), n_iter_max=20, factors=factors).eval()
    model = compress(resnet20, plan("int8"), calibration=_calibration(cifar), n_iter_max=20, factors=factors).eval()
    write_onnx(float_model, cifar, tmp_path / "cp32.onnx", "fp32")
    write_onnx(model, cifar, tmp_path / "cp8.onnx", "int8")
    fp32 = onnx_accuracy(tmp_path / "cp32.onnx", cifar, "test", limit=TEST_IMAGES)
    int8 = onnx_accuracy(tmp_path / "cp8.onnx", cifar, "test", limit=TEST_IMAGES)
    print(f"CP ({stabilize}): fp32 ONNX {fp32:.4f}, int8 ONNX {int8:.4f}, loss {(fp32 - int8) * 100:.2f} points")
    assert fp32 > 0.45  # far above chance (0.10): a working model before int8
    if max_loss is not None:
        assert fp32 - int8 <= max_loss
    if min_loss is not None:
        assert fp32 - int8 >= min_loss


def test_tucker2_int8_runs_every_quantized_conv_as_an_integer_kernel(tucker2_int8, tmp_path):
    """ONNX Runtime's optimised graph (ORT_ENABLE_ALL, saved) has one QLinearConv per int8 conv of the
    file, chain factors included, and float Conv nodes only for the layers the plan keeps in float."""
    import collections

    import onnx
    import onnxruntime as ort

    written = onnx.load_model(tucker2_int8.path)
    producers = {out: node.op_type for node in written.graph.node for out in node.output}
    convs = [node for node in written.graph.node if node.op_type == "Conv"]
    integer = sum(producers.get(node.input[1]) == "DequantizeLinear" for node in convs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tucker2_int8.path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load_model(tmp_path / "optimized.onnx").graph.node)
    print(f"optimised graph: {dict(ops)}; {integer} int8 convs of {len(convs)}")
    assert integer >= 50  # 18 decomposed layers, Tucker-2 chains of up to 3 convs
    assert ops["QLinearConv"] == integer
    assert ops["Conv"] + ops["FusedConv"] == len(convs) - integer
