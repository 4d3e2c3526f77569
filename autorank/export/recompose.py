"""Recomposed layers (`LayerPlan.run = "recomposed"`): stored as their factors, run as one op.

The exported fp32 graph holds a decomposed layer as its chain of Conv (or Gemm) nodes, the last one
with its BatchNorm folded in. For a recomposed layer the chain's nodes are replaced by one node of the
layer's geometry whose weight is a small constant subgraph over the factors:
Cast(int8/int4 factor) x per-channel scale (int8/int4 layers of an int8 file, on the search's grid), Cast(fp16 factor)
(fp16 layers of an int8 file) or the float factor itself, then one Einsum (the method's equation,
`methods.Method.recompose`). ONNX Runtime constant-folds that subgraph when it creates the session, so
the file is as small as the chain's and runs as one conv. DequantizeLinear is deliberately not used for
the factors: ONNX Runtime keeps DequantizeLinear nodes for its QDQ fusions and does not fold them
(measured, onnxruntime 1.32: the Einsum then runs on every inference).

The composed kernel is not on an integer grid, so the recomposed op computes in float; with int8
activations its input keeps the chain's input quantizer (`quantize_inputs` puts that QuantizeLinear /
DequantizeLinear pair in front of this node only, in a form that keeps ONNX Runtime from re-quantizing
the composed kernel), which is exactly what the quantization-aware model computes for a recomposed
chain (it rounds nothing inside the chain).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from autorank.compression.methods import Recomposed, decomposition, recomposed
from autorank.compression.quantize import INT_BITS, QMAX, ActivationFakeQuant
from autorank.errors import AutorankError
from autorank.export.precision import weight_scales


def recomposed_chains(model: nn.Module) -> dict[str, Recomposed]:
    """The model's chains that run recomposed, by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Recomposed)}


def input_qparams(chain: Recomposed) -> tuple[float, int, int] | None:
    """(scale, int8 zero point, input channels) of the chain's calibrated input quantizer, None without one."""
    first = chain[0]
    if not (isinstance(first, ActivationFakeQuant) and first.calibrated):
        return None
    scale, zero_point = first.qparams()
    op = chain[1]
    return float(scale), int(zero_point), op.in_channels if isinstance(op, nn.Conv2d) else op.in_features


def _integer(name: str, q: np.ndarray, precision: str) -> onnx.TensorProto:
    """An integer initializer as raw bytes: int8 one a byte, int4 two a byte (low nibble first, as ONNX packs)."""
    if precision == "int8":
        return numpy_helper.from_array(q, name)
    flat = q.flatten().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, q.shape, packed.tobytes(), raw=True)


def _factor(name: str, weight: np.ndarray, precision: str, file_precision: str) -> tuple[list, list, str]:
    """(initializers, nodes, float tensor name) storing one factor as an int8 file stores its layer's weights
    (fp32 and fp16 files: float, as for chains)."""
    if precision in INT_BITS and file_precision == "int8":
        scale = weight_scales(weight, precision).reshape(-1, *[1] * (weight.ndim - 1))
        q = np.clip(np.round(weight / scale), -QMAX[precision], QMAX[precision]).astype(np.int8)
        inits = [_integer(f"{name}_q", q, precision), numpy_helper.from_array(scale, f"{name}_scale")]
        nodes = [helper.make_node("Cast", [f"{name}_q"], [f"{name}_int"], to=TensorProto.FLOAT, name=f"{name}_cast"),
                 helper.make_node("Mul", [f"{name}_int", f"{name}_scale"], [name], name=f"{name}_mul")]
        return inits, nodes, name
    if precision == "fp16" and file_precision == "int8":  # an int8 file stores fp16 layers' weights in fp16
        half = numpy_helper.from_array(weight.astype(np.float16), f"{name}_fp16")
        return [half], [helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}_cast")], name
    return [numpy_helper.from_array(weight.astype(np.float32), name)], [], name


def recompose(graph_model: onnx.ModelProto, model: nn.Module, mapping: dict[str, list[str]],
              precisions: dict[str, str], file_precision: str) -> dict[str, list[str]]:
    """Replace the chain nodes of every recomposed layer of `model` in `graph_model` (the fp32 export),
    in place. `mapping` (module path -> node names) loses the chains' paths; returns layer path -> the
    nodes added for it (the op first, named after the layer), which quantization must leave alone."""
    graph = graph_model.graph
    arrays = {init.name: init for init in graph.initializer}
    added: dict[str, list[str]] = {}
    for path, chain in recomposed_chains(model).items():
        ops = [(f"{path}.{child}", m) for child, m in chain.named_children() if isinstance(m, nn.Conv2d | nn.Linear)]
        names = [node for op_path, _ in ops for node in mapping.get(op_path, [])]
        nodes = [next((n for n in graph.node if n.name == name), None) for name in names]
        if len(nodes) != len(ops) or any(n is None or n.input[1] not in arrays for n in nodes):
            raise AutorankError(f"recomposed layer {path}: its chain is not {len(ops)} compute nodes with weight "
                                "initializers in the exported graph")
        if any(n.op_type not in ("Conv", "Gemm") or n.op_type == "Gemm" and not any(
                a.name == "transB" and a.i for a in n.attribute) for n in nodes):  # weights as (out, in, ...)
            raise AutorankError(f"recomposed layer {path}: only Conv and Gemm(transB) chains can be composed")
        precision = precisions[ops[0][0]]
        inits, new, factors = [], [], []
        for i, node in enumerate(nodes):
            weight = numpy_helper.to_array(arrays[node.input[1]]).astype(np.float32)
            more_inits, more_nodes, tensor = _factor(f"{path}.factor{i}", weight, precision, file_precision)
            inits += more_inits
            new += more_nodes
            factors.append(tensor)
        kernel = f"{path}.kernel"
        new.append(helper.make_node("Einsum", factors, [kernel], equation=decomposition(chain.method).recompose,
                                    name=f"{path}.einsum"))
        one = recomposed(chain, chain.method)
        inputs = [nodes[0].input[0], kernel, *nodes[-1].input[2:3]]
        if isinstance(one, nn.Conv2d):
            op = helper.make_node("Conv", inputs, list(nodes[-1].output), name=path,
                                  kernel_shape=list(one.kernel_size), strides=list(one.stride),
                                  pads=[*one.padding, *one.padding], dilations=list(one.dilation), group=1)
        else:
            op = helper.make_node("Gemm", inputs, list(nodes[-1].output), name=path, transB=1)
        first = list(graph.node).index(nodes[0])
        kept = [n for n in graph.node if n not in nodes]
        ordered = kept[:first] + new + [op] + kept[first:]  # factors need only initializers; the op only x
        del graph.node[:]
        graph.node.extend(ordered)
        graph.initializer.extend(inits)
        for op_path, _ in ops:
            mapping.pop(op_path, None)
        added[path] = [path, *(n.name for n in new)]
    used = {name for node in graph.node for name in node.input}
    kept_inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return added
