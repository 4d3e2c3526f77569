"""PyTorch → one self-contained fp32 ONNX file whose compute nodes are named after their modules.

Engine level, below search and export: the search times lowered models (`engine.latency`) and export
writes them.

Exporter choice: the dynamo exporter (`torch.onnx.export(dynamo=True)`), the default and the maintained
path in torch 2.x (the TorchScript exporter is deprecated and names nodes by scope strings only).
`external_data=False` embeds the weights, so the `.onnx` is one file that can be copied, logged to
MLflow and served alone (CNNs of this size are far below protobuf's 2 GB limit).

The int8 step must know which ONNX nodes implement which module (the plan keeps some layers in
fp32/fp16). The exporter records each node's module stack in `pkg.torch.onnx.name_scopes`, but its
optimizer folds BatchNorm into the preceding Conv as a *new* node carrying the BatchNorm's metadata.
So the graph is exported unoptimised, every Conv/Gemm/MatMul and the BatchNorm it feeds are tagged
with the Conv's module path, the optimizer runs (constant folding, Conv+BN fusion), and the compute
nodes are renamed after their tag: `layer1.0.conv1.2` is the last factor of a decomposed conv.
"""

from __future__ import annotations

import ast
import warnings
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 21  # DequantizeLinear of int4 weights needs opset 21
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MODULE_KEY = "autorank.module"


def _module_path(scopes_text: str | None) -> str | None:
    """`['', 'layer1', 'layer1.0', 'conv1', 'conv2d']` → `layer1.0.conv1` (the innermost module)."""
    if not scopes_text:
        return None
    scopes = [s for s in ast.literal_eval(scopes_text) if s]
    if len(scopes) < 2:  # an op called directly in the root module's forward
        return None
    # container children carry their dotted path already ("layer1.0"), attributes only their name
    path = ""
    for scope in scopes[:-1]:
        path = scope if (not path or scope.startswith(path + ".")) else f"{path}.{scope}"
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with a fixed thread count, so that comparisons are fair."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path,
            folded: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Export `model` (eval mode, fp32, CPU) to the single file `path` with a dynamic batch axis.

    Returns module path → ONNX node names of the compute nodes (`{"layer1.0.conv1.0": [...]}`),
    which is what the int8 quantizer's `nodes_to_exclude` needs to honour a plan. `folded`, if
    given, receives conv module path → the module path of the BatchNorm folded into it.
    """
    model = model.eval().to("cpu", torch.float32)
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=OPSET, dynamo=True, external_data=False, optimize=False,
            dynamic_shapes=({0: "batch"},), verbose=False,
        )
    for node in program.model.graph:
        if node.op_type in COMPUTE_OPS:
            module_path = _module_path(node.metadata_props.get(SCOPES_KEY)) or node.name
            node.metadata_props[MODULE_KEY] = module_path
            for output in node.outputs:
                for user, _ in output.uses():
                    if user.op_type == "BatchNormalization":
                        user.metadata_props[MODULE_KEY] = module_path
                        bn_path = _module_path(user.metadata_props.get(SCOPES_KEY))
                        if folded is not None and bn_path:
                            folded[module_path] = bn_path
    program.optimize()
    seen: Counter[str] = Counter()
    mapping: dict[str, list[str]] = {}
    for node in program.model.graph:
        if node.op_type in COMPUTE_OPS:
            module_path = node.metadata_props.get(MODULE_KEY) or node.name
            seen[module_path] += 1
            node.name = module_path if seen[module_path] == 1 else f"{module_path}#{seen[module_path]}"
            mapping.setdefault(module_path, []).append(node.name)
        node.metadata_props.clear()  # stack traces and fx names: tens of KB a model, not for deployment
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, Path(path), save_as_external_data=False)
    return mapping

