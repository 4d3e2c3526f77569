"""fp16 and int8 files honour the plan: each layer's weights are stored as the plan says."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from autorank import engine
from autorank.compression import LayerPlan, Plan, compress, profile
from autorank.export import export_model
from autorank.export.api import write_onnx
from autorank.export.precision import payload_bytes, round_biases, to_int8
from autorank.models import create_model

# SmallCNN: features.0 (stem, left fp32), features.3/.7/.10 convs, classifier
PLAN = Plan({
    "features.3": LayerPlan("tucker2", [16, 16], "int8"),
    "features.7": LayerPlan("none", None, "fp16"),
    "features.10": LayerPlan("none", None, "int4"),
    "classifier": LayerPlan("none", None, "fp32"),
}, activations="int8")


@pytest.fixture(scope="module")
def trained_cnn(digits):
    model = create_model("small_cnn", digits)
    engine.train(model, digits, engine.TrainConfig(steps=60, batch_size=64, lr=0.05, device="cpu", seed=0))
    return model.eval()


@pytest.fixture(scope="module")
def mixed(trained_cnn, digits):
    calibration = [x for x, _ in digits.batches("train", 128, limit=512)]
    model = compress(trained_cnn, PLAN, calibration=calibration)
    engine.train(model, digits, engine.TrainConfig(steps=30, batch_size=64, lr=0.01, device="cpu", seed=0))
    return model.eval()


def _weight_storage(proto: onnx.ModelProto) -> dict[str, str]:
    """Compute node name → how its weight is stored: int8/int4 (DequantizeLinear), fp16 (Cast), fp32."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    inits = {init.name: init for init in proto.graph.initializer}
    kinds = {TensorProto.INT8: "int8", TensorProto.INT4: "int4", TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}
    storage = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight = node.input[1]
        if weight in inits:
            storage[node.name] = kinds[inits[weight].data_type]
        else:
            producer = producers[weight]
            assert producer.op_type in ("DequantizeLinear", "Cast"), producer.op_type
            storage[node.name] = kinds[inits[producer.input[0]].data_type]
    return storage


def test_int8_honours_the_plan(mixed, digits, tmp_path):
    result = export_model(mixed, digits, tmp_path / "mixed.onnx", "int8", bench=False)
    storage = _weight_storage(onnx.load_model(result.path))
    assert storage == {
        "features.0": "fp32",
        "features.3.1": "int8", "features.3.3": "int8", "features.3.5": "int8",
        "features.7": "fp16",
        "features.10.1": "int4",
        "classifier": "fp32",
    }
    v = result.verification
    assert v.images == len(digits.split("test")[1])
    assert v.top1_agreement >= 0.98
    assert abs(v.onnx_accuracy - v.torch_accuracy) <= 0.02
    assert v.torch_accuracy > 0.8
    # the file stores what the accounting counted: tensors within 10% of size_bytes
    assert result.payload_bytes == pytest.approx(result.size_bytes, rel=0.10)


def _dequantized_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Compute node name → its weight as ONNX Runtime reads it (integer x per-channel scale)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    inits = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        dq = producers.get(node.input[1]) if node.op_type in ("Conv", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = inits[dq.input[0]].astype(np.float32)
            scale = inits[dq.input[1]].reshape(-1, *([1] * (q.ndim - 1)))
            weights[node.name] = q * scale
    return weights


def test_integer_weights_are_the_ones_the_model_trained_with(mixed, digits, tmp_path):
    """int8 and int4 (ORT's own int4 grid is max|w|/7.5, the model's max|w|/7) stored exactly."""
    write_onnx(mixed, digits, tmp_path / "fp32.onnx", "fp32")
    write_onnx(mixed, digits, tmp_path / "int8.onnx", "int8")
    trained = {init.name: numpy_helper.to_array(init) for init in onnx.load_model(tmp_path / "fp32.onnx").graph.initializer}
    fp32_weight = {node.name: trained[node.input[1]] for node in onnx.load_model(tmp_path / "fp32.onnx").graph.node
                   if node.op_type in ("Conv", "Gemm")}
    stored = _dequantized_weights(onnx.load_model(tmp_path / "int8.onnx"))
    assert set(stored) == {"features.3.1", "features.3.3", "features.3.5", "features.10.1"}
    for name, weight in stored.items():
        np.testing.assert_allclose(weight, fp32_weight[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_fp16_keeps_fp32_io_and_halves_the_file(mixed, digits, tmp_path):
    fp32 = tmp_path / "m32.onnx"
    fp16 = tmp_path / "m16.onnx"
    write_onnx(mixed, digits, fp32, "fp32")
    write_onnx(mixed, digits, fp16, "fp16")
    proto = onnx.load_model(fp16)
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in proto.graph.initializer if len(i.dims) == 4} == {TensorProto.FLOAT16}
    assert payload_bytes(proto) == pytest.approx(payload_bytes(onnx.load_model(fp32)) / 2, rel=0.02)
    result = export_model(mixed, digits, fp16, "fp16", bench=False)
    assert result.verification.top1_agreement >= 0.98


def test_bad_options_are_one_line_errors(mixed, digits, tmp_path):
    from autorank.errors import AutorankError

    with pytest.raises(AutorankError, match="precision 'int3'"):
        export_model(mixed, digits, tmp_path / "x.onnx", "int3")
    with pytest.raises(AutorankError, match="calibration batches"):
        export_model(mixed, digits, tmp_path / "x.onnx", "int8", calibration_batches=0)
    assert not (tmp_path / "x.onnx").exists()
    assert profile(mixed, digits.input_shape).size_bytes > 0


def _one_conv(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["input", "w", "b"], ["logits"], name="conv")], "one_conv",
        [onnx.helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, weight.shape[1], 3, 3])],
        [onnx.helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, weight.shape[0], 3, 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])


def test_round_biases_puts_biases_on_the_int32_grid_onnx_runtime_uses(tmp_path):
    weight = np.zeros((2, 1, 1, 1), np.float32)
    weight[:, 0, 0, 0] = [1.27, -0.5]
    bias = np.array([0.123456, -0.3], np.float32)
    model = _one_conv(weight, bias)
    shifts = round_biases(model, {"input": (-1.0, 3.0)}, {"conv": "int8"})
    # by hand: input scale (3 - -1) / 255, weight scales 1.27 / 64 and 0.5 / 64 (int8 on [-64, 64])
    step = np.float32(4 / 255) * np.array([1.27 / 64, 0.5 / 64], np.float32)
    expected = np.round(bias / step) * step
    rounded = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b"))
    np.testing.assert_allclose(rounded, expected, rtol=1e-6)
    np.testing.assert_allclose(shifts["conv"][0], expected - bias, rtol=1e-5)
    assert (np.abs(shifts["conv"][0]) <= step / 2 + 1e-9).all() and shifts["conv"][0].any()
    # ONNX Runtime's quantizer, fed the same input range, stores exactly these integers
    onnx.save_model(model, tmp_path / "fp32.onnx")
    calibration = [np.random.default_rng(0).uniform(-1, 3, (1, 1, 3, 3)).astype(np.float32)]
    to_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration, activation_ranges={"input": (-1.0, 3.0)})
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_model(tmp_path / "int8.onnx").graph.initializer}
    stored = next(v for v in inits.values() if v.dtype == np.int32)
    np.testing.assert_array_equal(stored, np.round(bias / step).astype(np.int32))
    # ... and keeps the weights on the search's grid: the largest of each channel is level 64
    levels = next(v for v in inits.values() if v.dtype == np.int8 and v.ndim == 4)
    np.testing.assert_array_equal(levels[:, 0, 0, 0], [64, -64])
