"""fp32 ONNX → fp16 or int8 with ONNX Runtime's own converters, honouring a compression plan.

- fp16: `onnxruntime.transformers.float16` converts weights and activations, keeping fp32 inputs and
  outputs so that callers feed and read the same tensors as from the fp32 model.
- int8: `onnxruntime.quantization.quantize_static`, QDQ format (portable: any runtime that reads
  QuantizeLinear/DequantizeLinear runs it; ORT fuses the pairs into integer kernels), symmetric
  per-channel int8 weights, activations calibrated on batches of the training split. Layers the plan
  keeps in fp32/fp16 are excluded from quantization (their nodes via `nodes_to_exclude`); fp16 layers
  store their weights as fp16 with a Cast, so the file's size follows the plan. Every integer weight
  keeps the search's own grid through ORT's `TensorQuantOverrides`: int8 on [-64, 64] (exact on x86
  CPUs without VNNI, see compression/quantize.py), int4 on [-7, 7] (opset 21 DequantizeLinear).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from autorank.compression.quantize import QMAX
from autorank.engine.deploy import COMPUTE_OPS, INPUT_NAME

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT8_SCOPES = ("plan", "full")


class _Batches:
    """ORT's `CalibrationDataReader` protocol over an iterable of float32 NCHW arrays."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def __len__(self) -> int:  # ORT asks for it to size some calibrators; unknown up front
        return 0


def to_fp16(src: str | Path, dst: str | Path) -> None:
    """All weights and activations fp16; inputs and outputs stay fp32. Einsum nodes (a recomposed layer's
    kernel, `recompose.py`) compute in fp32 between Casts: ONNX Runtime did not constant-fold an fp16 Einsum
    (measured, onnxruntime 1.32), the fp32 one it folds."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_model(src)
    einsums = [node.name for node in model.graph.node if node.op_type == "Einsum"]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=einsums)
    halves = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    factors = {name for node in model.graph.node if node.op_type == "Einsum" for name in node.input if name in halves}
    if factors:  # the blocked Einsum's float factors: stored fp16 like every other weight, cast back at load
        _store_fp16(model, factors)
    onnx.save_model(model, dst)


def to_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[np.ndarray],
    *,
    exclude_fp32: list[str] = (),
    exclude_fp16: list[str] = (),
    int4_nodes: list[str] = (),
    activation_ranges: dict[str, tuple[float, float]] | None = None,
    output_qparams: dict[str, tuple[float, int]] | None = None,
    method: str = "minmax",
    activation_type: str = "uint8",
    scope: str = "plan",
    weight_only: bool = False,
) -> None:
    """Static QDQ int8 of the fp32 model at `src`; the listed node names are kept as the plan says.

    `scope`: `plan` quantizes exactly what the quantization-aware model simulated (weights and
    inputs of Conv/Gemm/MatMul), so ONNX Runtime computes the model the search measured; `full` is
    ONNX Runtime's complete static QDQ (also conv outputs, Add, ...), which lets it fuse integer
    kernels (QLinearConv) for speed at the cost of extra rounding the search never saw.
    `weight_only` (a plan with fp32 activations): int8/int4 weights, float activations, as simulated.
    `activation_type` is `uint8` (ORT's recommended U8S8 on x86) or `int8` (S8S8, better on ARM).
    `activation_ranges` (tensor name → (min, max)) replace calibration where the quantization-aware
    model already fixed a range: its fine-tuned weights rely on exactly that clipping.
    `output_qparams` (conv output tensor → (scale, int8 zero point)): the convs whose outputs the
    model quantizes get that QuantizeLinear/DequantizeLinear pair, so that every int8 conv's output
    feeds a QuantizeLinear and ONNX Runtime fuses it into QLinearConv (`quantize_outputs`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if scope not in INT8_SCOPES:
        raise ValueError(f"int8 scope {scope!r}: choose from {', '.join(INT8_SCOPES)}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
    model = onnx.load_model(src)
    weights = _weight_inputs(model)
    arrays = {init.name: init for init in model.graph.initializer}
    excluded = {*exclude_fp32, *exclude_fp16}
    axes = {node.name: _channel_axis(node) for node in model.graph.node}
    overrides = {
        weight: _weight_grid(numpy_helper.to_array(arrays[weight]), "int4" if node in int4_nodes else "int8",
                             axes[node])
        for node, weight in weights.items() if node not in excluded
    }
    for tensor, (low, high) in (activation_ranges or {}).items():
        overrides[tensor] = [{"rmin": np.float32(min(low, 0.0)), "rmax": np.float32(max(high, 0.0))}]
    ort_logger = logging.getLogger("onnxruntime")
    level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)  # ORT logs every tensor it calibrates at INFO
    try:
        quantize_static(
            model, dst, _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(COMPUTE_OPS) if scope == "plan" else None,
            per_channel=True,
            activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*exclude_fp32, *exclude_fp16],
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
            extra_options={
                "WeightSymmetric": True, "TensorQuantOverrides": overrides,
                "OpTypesToExcludeOutputQuantization": list(COMPUTE_OPS) if scope == "plan" else [],
                # int32 biases (round_biases put plan layers' biases on that grid already)
                "QuantizeBias": not weight_only,
            },
        )
    finally:
        ort_logger.setLevel(level)
    quantized = onnx.load_model(dst)
    if scope == "plan":
        _float_for_unquantized_consumers(quantized, everywhere=weight_only)
        if not weight_only:
            quantize_outputs(quantized, output_qparams or {}, activation_type)
    _store_fp16_weights(quantized, list(exclude_fp16))
    onnx.save_model(quantized, dst)


def weight_scales(weight: np.ndarray, precision: str) -> np.ndarray:
    """Per-output-channel scales of the quantization-aware model's weight grid, max|w| / qmax."""
    absmax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1).astype(np.float32)
    return np.where(absmax > 0, absmax / np.float32(QMAX[precision]), np.float32(1.0))


def _channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a compute node's weight: Conv and Gemm(transB) store (out, ...)."""
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1


def _weight_grid(weight: np.ndarray, precision: str, axis: int = 0) -> list[dict]:
    """ORT tensor overrides that keep a weight on the search's grid instead of ORT's own.

    ORT's symmetric scales are max|w| / 127 (int8) and 2 max|w| / 15 (int4, range [-8, 7]); the
    search's are max|w| / 64 (int8 on 7-bit levels, saturation-free on any x86: quantize.py) and
    max|w| / 7. Recomputing would move the trained weights to a grid the search never measured.
    """
    from onnxruntime.quantization import QuantType

    quant_type = QuantType.QInt4 if precision == "int4" else QuantType.QInt8
    channels_first = np.moveaxis(weight, axis, 0)
    return [{"axis": axis, "quant_type": quant_type, "scale": scale, "zero_point": np.int8(0)}
            for scale in weight_scales(channels_first, precision)]


def _float_for_unquantized_consumers(model: onnx.ModelProto, *, everywhere: bool = False) -> None:
    """Give the float tensor back to consumers the plan does not quantize.

    ORT's quantizer routes *every* consumer of a quantized activation through its
    DequantizeLinear, so a residual Add or an fp32 layer would read the rounded tensor; the
    quantization-aware model rounds only the inputs of its int8/int4 layers (`everywhere`: none,
    for weight-only plans; the activation Quantize/DequantizeLinear pairs are then removed).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name for init in model.graph.initializer}

    def quantized_layer(node: onnx.NodeProto) -> bool:
        weight = producers.get(node.input[1]) if node.op_type in COMPUTE_OPS and len(node.input) > 1 else None
        return weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in initializers

    float_of = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            quantize = producers.get(node.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                float_of[node.output[0]] = quantize.input[0]
    for node in model.graph.node:
        if (quantized_layer(node) and not everywhere) or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        node.input[:] = [float_of.get(name, name) for name in node.input]
    outputs = {value.name for value in model.graph.output}
    if outputs & set(float_of):  # a graph output that was quantized: keep the float value visible
        raise RuntimeError("a graph output was routed through QuantizeLinear/DequantizeLinear")
    while True:  # drop Quantize/DequantizeLinear nodes nobody reads any more
        read = {name for node in model.graph.node for name in node.input} | outputs
        dead = [node for node in model.graph.node if not any(out in read for out in node.output)]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


def quantize_outputs(model: onnx.ModelProto, qparams: dict[str, tuple[float, int]], activation_type: str) -> None:
    """Insert QuantizeLinear → DequantizeLinear on each listed tensor; its readers read the rounded value.

    `qparams`: tensor → (scale, zero point on the int8 grid [-128, 127]), as the quantization-aware
    model rounds it; `activation_type` uint8 stores the same levels shifted by 128 (zero point + 128).
    """
    producers = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    outputs = {value.name for value in model.graph.output}
    nodes = list(model.graph.node)
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for tensor, (scale, zero_point) in qparams.items():
        if tensor in outputs or tensor not in producers:
            raise RuntimeError(f"cannot quantize {tensor!r}: a graph output or no node produces it")
        point = np.array(zero_point + 128, np.uint8) if activation_type == "uint8" else np.array(zero_point, np.int8)
        names = {key: f"{tensor}_out_{key}" for key in ("scale", "zero_point", "q", "dq")}
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), names["scale"]),
                                        numpy_helper.from_array(point, names["zero_point"])])
        for node in nodes:
            node.input[:] = [names["dq"] if name == tensor else name for name in node.input]
        inserted[producers[tensor]] = [
            onnx.helper.make_node("QuantizeLinear", [tensor, names["scale"], names["zero_point"]], [names["q"]]),
            onnx.helper.make_node("DequantizeLinear", [names["q"], names["scale"], names["zero_point"]], [names["dq"]]),
        ]
    ordered = [n for index, node in enumerate(nodes) for n in (node, *inserted.get(index, []))]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def quantize_inputs(model: onnx.ModelProto, qparams: dict[str, tuple[float, int, int]], activation_type: str) -> None:
    """Insert QuantizeLinear → DequantizeLinear in front of input 0 of each listed node, for that node only.

    `qparams`: node name → (scale, zero point on the int8 grid, input channels), as the quantization-aware
    model rounds that node's input; other readers of the tensor keep reading it as before (a residual Add
    its float value). For the float ops that quantize_static leaves alone but the model rounds the input
    of: the recomposed layers (`recompose.py`). The DequantizeLinear holds its scale once per channel
    (axis 1, all equal: the same values): with a per-tensor scale, ONNX Runtime's WeightBiasQuantization
    (onnxruntime >= 1.20) re-quantizes the float weight of a Conv/Gemm whose output reaches a
    QuantizeLinear to per-tensor int8 at load time, a rounding the search never measured (measured on a
    ResNet-20 plan: 8 of 17 recomposed convs, 1.2% of its top-1 predictions changed).
    """
    nodes = list(model.graph.node)
    ordered = []
    for node in nodes:
        if node.name in qparams:
            scale, zero_point, channels = qparams[node.name]
            point = np.array(zero_point + 128, np.uint8) if activation_type == "uint8" else np.array(zero_point, np.int8)
            names = {key: f"{node.name}_in_{key}" for key in ("scale", "zero_point", "scales", "zero_points", "q", "dq")}
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array(scale, np.float32), names["scale"]),
                numpy_helper.from_array(point, names["zero_point"]),
                numpy_helper.from_array(np.full(channels, scale, np.float32), names["scales"]),
                numpy_helper.from_array(np.full(channels, point), names["zero_points"])])
            ordered += [
                onnx.helper.make_node("QuantizeLinear", [node.input[0], names["scale"], names["zero_point"]],
                                      [names["q"]]),
                onnx.helper.make_node("DequantizeLinear", [names["q"], names["scales"], names["zero_points"]],
                                      [names["dq"]], axis=1),
            ]
            node.input[0] = names["dq"]
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def round_biases(model: onnx.ModelProto, input_ranges: dict[str, tuple[float, float]],
                 weight_precisions: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Put the float biases of integer layers on their int32 grid, in place; returns the shifts.

    Integer inference (QLinearConv, or ORT's own bias quantization at load time) adds the bias as
    int32 at scale input_scale x weight_scale. That moves a BatchNorm-folded bias by under half an
    accumulator step, yet in a network of rounded activations such a nudge flips rounding decisions
    downstream: measured, 1.1% of ResNet-20's top-1 predictions. Rounding here, where the scales
    are known (`input_ranges`: the quantization-aware model's activation ranges, which the
    quantizer will use unchanged), lets the PyTorch reference apply the very same shifts.

    `weight_precisions` maps Conv/Gemm node names to int8 or int4. Returns node name → (shift per
    output channel, folded weight), for the PyTorch side (`api._shift_biases`).
    """
    initializers = {init.name: init for init in model.graph.initializer}
    shifts = {}
    for node in model.graph.node:
        precision = weight_precisions.get(node.name)
        if (precision is None or len(node.input) < 3 or node.input[0] not in input_ranges
                or node.input[2] not in initializers):
            continue
        low, high = input_ranges[node.input[0]]
        input_scale = np.float32((max(high, 0.0) - min(low, 0.0)) / 255.0)  # ORT: (rmax - rmin) / (qmax - qmin)
        if not input_scale > 0:
            continue
        weight = np.moveaxis(numpy_helper.to_array(initializers[node.input[1]]), _channel_axis(node), 0)
        step = (input_scale * weight_scales(weight, precision)).astype(np.float32)
        bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
        rounded = (np.round(bias.astype(np.float64) / step) * step).astype(np.float32)
        initializers[node.input[2]].CopyFrom(numpy_helper.from_array(rounded, node.input[2]))
        shifts[node.name] = (rounded - bias, weight)
    return shifts


def _weight_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Compute node name → the initializer that is its weight (input 1 of Conv/Gemm/MatMul)."""
    initializers = {init.name for init in model.graph.initializer}
    return {
        node.name: node.input[1]
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers
    }


def _store_fp16_weights(model: onnx.ModelProto, node_names: list[str]) -> None:
    """Weights of the given (unquantized) nodes stored as fp16 and cast back to fp32 at load time."""
    weight_of = _weight_inputs(model)
    weights = {weight_of[name] for name in node_names if name in weight_of}
    if weights:
        _store_fp16(model, weights)


def _store_fp16(model: onnx.ModelProto, weights: set[str]) -> None:
    """The named float initializers stored as fp16, each read through a Cast back to fp32."""
    casts = []
    for init in model.graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}.fp16")
            casts.append(onnx.helper.make_node(
                "Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT, name=f"{init.name}.cast"
            ))
            init.CopyFrom(half)
    nodes = casts + list(model.graph.node)  # casts first: the graph stays topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data (initializers and Constant nodes), int4 packed two to a byte."""
    tensors = list(model.graph.initializer) + [
        attr.t for node in model.graph.node if node.op_type == "Constant" for attr in node.attribute if attr.t.dims
    ]
    total = 0
    for tensor in tensors:
        bits = 4 if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else \
            8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += -(-int(np.prod(tensor.dims, dtype=np.int64)) * bits // 8)
    return total


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what deployment does not need, so that the file's size is its tensors' size.

    Small compressed CNNs have hundreds of QDQ nodes; their descriptive tensor names and shape
    annotations would otherwise outweigh the int8 weights. Compute nodes keep their module names;
    all-zero zero points of weight DequantizeLinear nodes (symmetric int8: 0 is the default) go.
    """
    graph = model.graph
    del graph.value_info[:]
    del graph.metadata_props[:]  # the exporter's graph signature: ~10 KB of parameter names
    for value in (*graph.input, *graph.output):
        del value.metadata_props[:]
    zero_points = {
        init.name for init in graph.initializer
        if init.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(init).any()
    }
    initializers = {init.name for init in graph.initializer}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in zero_points
                and node.input[0] in initializers):
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    keep = {value.name for value in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, _base36(len(names)))

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            node.name = ""
        node.doc_string = ""
    return model
