"""A ResNet-20 layer run recomposed (LayerPlan.run): the file stores its factors, ONNX Runtime runs one conv.

The same factors are exported as a chain and recomposed; the recomposed file agrees with its PyTorch
model, is no larger, and ONNX Runtime's optimised graph has the layer as one conv, with nothing left
of the subgraph that composes its kernel.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress
from autorank.export import ExportResult, export_model
from autorank.models import create_model
from tests.conftest import CIFAR_MODELS

WEIGHTS = CIFAR_MODELS / "resnet20-12fca82f-jpeg-adapted.pt"
LAYER = "layer2.1.conv1"
CONVS = ("Conv", "FusedConv", "QLinearConv")


@pytest.fixture(scope="module")
def resnet20(cifar) -> nn.Module:
    return create_model("resnet20", cifar, WEIGHTS).eval()


@pytest.fixture(scope="module")
def calibration(cifar) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [x for x, _ in cifar.batches("train", 128, shuffle=True, generator=generator, limit=256)]


def _export(resnet20, cifar, calibration, folder: Path, method: str, rank, precision: str, run: str,
            factors: dict) -> ExportResult:
    activations = "int8" if precision == "int8" else "fp32"
    plan = Plan({LAYER: LayerPlan(method, rank, "int8" if precision == "int8" else "fp32", run=run)}, activations)
    model = compress(resnet20, plan, calibration=calibration, n_iter_max=10, factors=factors).eval()
    return export_model(model, cifar, folder / f"{method}-{run}.onnx", precision, verify_limit=1000, bench=False)


def _optimised_ops(path: Path, folder: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load_model(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("method, rank, precision, chain_convs", [
    ("tucker2", "vbmf:0.2", "int8", 3), ("cp", 0.5, "int8", 4), ("tucker2", "vbmf:0.2", "fp32", 3),
    ("cp", 0.5, "fp16", 4),
])
def test_a_recomposed_layer_runs_as_one_conv_from_a_file_as_small_as_its_chain(resnet20, cifar, calibration,
                                                                                tmp_path, method, rank, precision,
                                                                                chain_convs):
    factors: dict = {}  # one decomposition for both runs
    chain = _export(resnet20, cifar, calibration, tmp_path, method, rank, precision, "chain", factors)
    one = _export(resnet20, cifar, calibration, tmp_path, method, rank, precision, "recomposed", factors)
    v = one.verification
    print(f"{method} {precision}: chain {chain.file_bytes:,} B (tensors {chain.payload_bytes:,}), recomposed "
          f"{one.file_bytes:,} B (tensors {one.payload_bytes:,}); agreement {v.top1_agreement:.4f}, "
          f"max |diff| {v.max_abs_error:.3g} (chain {chain.verification.max_abs_error:.3g})")
    assert v.torch_accuracy > 0.7 and abs(v.onnx_accuracy - v.torch_accuracy) <= 0.005
    assert v.top1_agreement >= 0.99
    assert one.payload_bytes <= chain.payload_bytes  # the same factors; the chain's inner QDQ parameters go
    assert one.file_bytes <= chain.file_bytes * 1.005
    written = collections.Counter(n.op_type for n in onnx.load_model(one.path).graph.node)
    assert written["Einsum"] == 1  # what the file holds: the composing subgraph over the stored factors
    ops, chain_ops = _optimised_ops(one.path, tmp_path), _optimised_ops(chain.path, tmp_path)
    print(f"optimised: chain {dict(chain_ops)}; recomposed {dict(ops)}")
    assert sum(ops[op] for op in CONVS) == sum(chain_ops[op] for op in CONVS) - (chain_convs - 1)
    assert ops["Einsum"] == ops["Mul"] == 0  # folded when the session was created
    assert ops["QLinearConv"] == 0  # the layer's chain was the only integer layer; recomposed, it runs in float


def test_consecutive_recomposed_int8_layers_keep_their_float_kernels_in_onnx_runtime(resnet20, cifar, calibration,
                                                                                     tmp_path):
    """A recomposed conv whose output reaches the next layer's QuantizeLinear (conv1 -> ReLU -> conv2) is what
    ONNX Runtime's WeightBiasQuantization re-quantizes to per-tensor int8 when its input's DequantizeLinear
    is per tensor; export's per-channel form keeps both convs in float, as the PyTorch model computes."""
    plan = Plan({name: LayerPlan("tucker2", "vbmf:0.2", "int8", run="recomposed")
                 for name in ("layer2.1.conv1", "layer2.1.conv2")}, "int8")
    model = compress(resnet20, plan, calibration=calibration, n_iter_max=10).eval()
    result = export_model(model, cifar, tmp_path / "both.onnx", "int8", verify_limit=1000, bench=False)
    ops = _optimised_ops(result.path, tmp_path)
    v = result.verification
    print(f"optimised: {dict(ops)}; agreement {v.top1_agreement:.4f}, max |diff| {v.max_abs_error:.3g}")
    assert ops["QLinearConv"] == 0 and ops["Einsum"] == 0
    assert v.top1_agreement >= 0.995 and v.max_abs_error < 0.05


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_every_layer_recomposed_including_an_svd_classifier(digits, precision):
    """A small CNN with every conv (Tucker-2) and its classifier (SVD, a Gemm) recomposed: the file has one
    compute node per layer and computes what PyTorch does."""
    import tempfile

    from autorank.compression import find_layers
    from autorank.engine import TrainConfig, train

    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    train(model, digits, TrainConfig(steps=30, batch_size=64, lr=0.05, seed=0, device="cpu"))
    layers = find_layers(model.eval())
    plan = Plan({name: LayerPlan("svd" if isinstance(layer, nn.Linear) else "tucker2", 0.5, precision,
                                 run="recomposed") for name, layer in layers.items()},
                "int8" if precision == "int8" else "fp32")
    calibration = [x for x, _ in digits.batches("train", 64, limit=256)]
    compressed = compress(model, plan, calibration=calibration, n_iter_max=10).eval()
    with tempfile.TemporaryDirectory() as tmp:
        result = export_model(compressed, digits, Path(tmp) / "all.onnx", precision, bench=False)
        written = onnx.load_model(result.path)
    ops = collections.Counter(n.op_type for n in written.graph.node)
    assert ops["Einsum"] == len(layers) and ops["Conv"] + ops["Gemm"] == len(layers) + 1  # + the first conv
    v = result.verification
    assert v.top1_agreement >= 0.99 and abs(v.onnx_accuracy - v.torch_accuracy) <= 0.005
