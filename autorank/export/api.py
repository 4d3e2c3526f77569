"""`export_onnx`: a searched trial → a verified, benchmarked, registered ONNX file.

`export_model` is the same pipeline for any compressed model in memory (what tests and the demo
use); `export_onnx` rebuilds a trial of a search folder from its saved weights (no retraining) and
adds the search's provenance: the accuracy it recorded, its MLflow run, the registry.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import nn

from autorank.compression import layer_precisions, profile, strip_fake_quant
from autorank.compression.quantize import QMAX, ActivationFakeQuant
from autorank.data import Dataset
from autorank.errors import AutorankError, TrackingFailed
from autorank.export.bench import benchmark
from autorank.engine.deploy import to_onnx
from autorank.export.precision import (CALIBRATION_METHODS, INT8_SCOPES, compact, payload_bytes, quantize_inputs,
                                     round_biases, to_fp16, to_int8)
from autorank.export.recompose import input_qparams, recompose, recomposed_chains
from autorank.export.registry import check_registered_name, register_model, write_card
from autorank.export.result import ExportResult
from autorank.export.verify import onnx_accuracy, verify
from autorank.search.results import rebuild_trial

EXPORT_PRECISIONS = ("fp32", "fp16", "int8")


def _check_options(precision: str, calibration_batches: int, calibration_method: str, threads: int | None,
                   int8_scope: str = "plan") -> None:
    if int8_scope not in INT8_SCOPES:
        raise AutorankError(f"int8 scope {int8_scope!r}: choose from {', '.join(INT8_SCOPES)}")
    if precision not in EXPORT_PRECISIONS:
        raise AutorankError(f"precision {precision!r}: choose from {', '.join(EXPORT_PRECISIONS)}")
    if calibration_batches < 1:
        raise AutorankError(f"calibration batches must be >= 1, got {calibration_batches}")
    if calibration_method not in CALIBRATION_METHODS:
        raise AutorankError(f"calibration method {calibration_method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
    if threads is not None and threads < 1:
        raise AutorankError(f"threads must be >= 1, got {threads}")


def _calibration(data: Dataset, batches: int, batch_size: int, seed: int):
    for x in data.calibration_images(batches * batch_size, batch_size, seed=seed):
        yield x.numpy()


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer prints progress and root-logger advice; keep the CLI's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _trained_ranges(model: nn.Module, mapping: dict[str, list[str]],
                    fp32: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Input tensor of each ONNX node → the activation range the quantization-aware model learned.

    The compression core puts an `ActivationFakeQuant` right before each quantized conv/linear of a
    chain; a QAT-fine-tuned model depends on that exact clipping, so ONNX Runtime must not
    re-calibrate those inputs. A tensor feeding several quantized layers gets the union of ranges.
    """
    inputs = {node.name: node.input[0] for node in fp32.graph.node}
    ranges: dict[str, tuple[float, float]] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (_, quantizer), (child_name, child) in zip(children, children[1:]):
            if not (isinstance(quantizer, ActivationFakeQuant) and quantizer.calibrated
                    and isinstance(child, nn.Conv2d | nn.Linear)):
                continue
            low, high = float(quantizer.min_val), float(quantizer.max_val)
            for node in mapping.get(f"{parent_name}.{child_name}" if parent_name else child_name, []):
                tensor = inputs[node]
                old = ranges.get(tensor, (low, high))
                ranges[tensor] = (min(old[0], low), max(old[1], high))
    return ranges


def _output_quantizers(model: nn.Module, mapping: dict[str, list[str]],
                       fp32: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Output tensor of each int8 conv the model fake-quantizes at its output → (scale, int8 zero point).

    The compression core quantizes such a conv's output after its BatchNorm (`output_of`), which in
    the file is the output of the chain's last, BatchNorm-folded Conv node. The quantizer's own scale
    and zero point are used, so the file rounds exactly as the model did.
    """
    outputs = {node.name: node.output[0] for node in fp32.graph.node}
    found = {}
    for quantizer in model.modules():
        if not (isinstance(quantizer, ActivationFakeQuant) and quantizer.output_of and quantizer.calibrated):
            continue
        layer = quantizer.output_of
        nodes = [node for path, names in mapping.items() if path == layer or path.startswith(f"{layer}.")
                 for node in names]
        if not nodes:
            raise AutorankError(f"no ONNX node found for layer {layer}, whose output the model quantizes")
        scale, zero_point = quantizer.qparams()
        found[outputs[nodes[-1]]] = (float(scale), int(zero_point))
    return found


@dataclass
class Written:
    """What `write_onnx` wrote: the plan it honoured and the PyTorch model the file computes."""

    precisions: dict[str, str]  # weight precision of every Conv2d/Linear, by module name
    reference: nn.Module        # int8: a copy with the file's int32 bias rounding applied; else the model


def _shift_biases(model: nn.Module, mapping: dict[str, list[str]],
                  shifts: dict[str, tuple[np.ndarray, np.ndarray]]) -> nn.Module:
    """A copy of `model` whose outputs move by the same per-channel bias shifts as the ONNX file.

    The file's layers have BatchNorm folded in (weight x a, bias x a + b per channel); PyTorch keeps
    them apart, so a shift d of the folded bias is d / a on the layer's own bias, where a is read
    off the folded weight against the layer's (quantized) weight.
    """
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path, nodes in mapping.items():
            for node in nodes:
                if node not in shifts:
                    continue
                delta, folded = shifts[node]
                layer = reference.get_submodule(path)
                weight = layer.weight.detach().double().flatten(1).numpy()
                folded = folded.astype(np.float64).reshape(weight.shape[0], -1)
                norm = (weight * weight).sum(1)
                scale = np.divide((weight * folded).sum(1), norm, out=np.zeros_like(norm), where=norm > 0)
                bias_shift = np.divide(delta, scale, out=np.zeros_like(norm), where=np.abs(scale) > 1e-12)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=layer.weight.dtype))
                layer.bias += torch.from_numpy(bias_shift).to(layer.bias.dtype)
    return reference


def write_onnx(model: nn.Module, data: Dataset, out: str | Path, precision: str = "int8", *,
               calibration_batches: int = 8, calibration_batch_size: int = 64,
               calibration_method: str = "minmax", activation_type: str = "uint8", int8_scope: str = "plan",
               seed: int = 0) -> Written:
    """Write `model` (a compressed model, fake quantization included) as ONNX at `precision`."""
    _check_options(precision, calibration_batches, calibration_method, None, int8_scope)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    precisions = layer_precisions(model)
    plain = strip_fake_quant(model)
    reference = model
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = out if precision == "fp32" else Path(tmp) / "fp32.onnx"
        batchnorms: dict[str, str] = {}
        mapping = to_onnx(plain, data.input_shape, fp32_path, folded=batchnorms)
        unmapped = [name for name in precisions if name not in mapping]
        if unmapped:  # e.g. a layer used through a functional call: its plan could not be honoured
            raise AutorankError(f"no ONNX node found for layers {', '.join(unmapped[:4])}; cannot honour the plan")
        chains = recomposed_chains(plain)
        recomposed: dict[str, list[str]] = {}
        if chains:  # their chains' nodes become one op over the factors, which quantization leaves alone
            graph = onnx.load_model(fp32_path)
            recomposed = recompose(graph, plain, mapping, precisions, precision)
            onnx.save_model(graph, fp32_path)
        if precision == "fp16":
            to_fp16(fp32_path, out)
        elif precision == "int8":
            def nodes(wanted: str) -> list[str]:
                return [node for name, p in precisions.items() if p == wanted for node in mapping.get(name, [])]

            weight_only = not any(isinstance(m, ActivationFakeQuant) for m in model.modules())
            fp32 = onnx.load_model(fp32_path)
            ranges = _trained_ranges(model, mapping, fp32)
            output_qparams = _output_quantizers(model, mapping, fp32)
            if not weight_only:
                integer = {node: p for name, p in precisions.items() if p in QMAX for node in mapping.get(name, [])}
                reference = _shift_biases(model, mapping, round_biases(fp32, ranges, integer))
                onnx.save_model(fp32, fp32_path)
            with _quiet():
                to_int8(fp32_path, out, _calibration(data, calibration_batches, calibration_batch_size, seed),
                        exclude_fp32=nodes("fp32") + [n for added in recomposed.values() for n in added],
                        exclude_fp16=nodes("fp16"), int4_nodes=nodes("int4"),
                        activation_ranges=ranges, output_qparams=output_qparams, method=calibration_method, activation_type=activation_type,
                        scope=int8_scope, weight_only=weight_only)
    written = onnx.load_model(out)
    if precision == "int8":  # a recomposed layer's input is rounded as its chain's input quantizer rounds it
        qparams = {path: input_qparams(model.get_submodule(path)) for path in chains}
        quantize_inputs(written, {path: qp for path, qp in qparams.items() if qp is not None}, activation_type)
    written = compact(written)
    onnx.save_model(written, out)
    if precision == "int8" and reference is not model:
        reference = _fold_batchnorms(reference, mapping, batchnorms, written)
    return Written(precisions, reference)


def _stored(model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """A constant input of the file as ONNX Runtime computes it: a float initializer, or the
    DequantizeLinear of an integer one ((q - zero point) x scale in float32, per output channel)."""
    arrays = {init.name: init for init in model.graph.initializer}
    if tensor in arrays:
        return numpy_helper.to_array(arrays[tensor]).astype(np.float32)
    node = next(node for node in model.graph.node if tensor in node.output)
    q = numpy_helper.to_array(arrays[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(arrays[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(arrays[node.input[2]]).astype(np.float32) if len(node.input) > 2 else np.float32(0)
    shape = (-1,) + (1,) * (q.ndim - 1) if scale.ndim else ()
    return (q - np.reshape(zero, shape)) * np.reshape(scale, shape)


def _fold_batchnorms(reference: nn.Module, mapping: dict[str, list[str]], batchnorms: dict[str, str],
                     written: onnx.ModelProto) -> nn.Module:
    """The reference with each integer conv's BatchNorm folded in as the file folds and stores it.

    The file rounds a conv's BatchNorm-folded output to 8 bits where the next layer (or the conv's own
    output quantizer) reads it; PyTorch computes that value unfolded, which differs by float rounding,
    and a value on a rounding boundary then lands one level apart. On a residual stream such flips
    propagate. The reference therefore takes the file's own dequantized weights and bias for these
    convs (the quantization-aware model's values, folded, on the file's grid) and drops the BatchNorm.
    """
    reference = copy.deepcopy(reference)
    nodes = {node.name: node for node in written.graph.node}
    producers = {out: node for node in written.graph.node for out in node.output}
    for conv_path, bn_path in batchnorms.items():
        node = nodes.get(mapping.get(conv_path, [""])[-1])
        if node is None or node.op_type != "Conv" or len(node.input) < 3:
            continue
        weight = producers.get(node.input[1])
        if weight is None or weight.op_type != "DequantizeLinear":  # a float layer: nothing rounds there
            continue
        conv = reference.get_submodule(conv_path)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
        with torch.no_grad():
            folded.weight.copy_(torch.from_numpy(_stored(written, node.input[1])))
            folded.bias.copy_(torch.from_numpy(_stored(written, node.input[2])))
        reference.set_submodule(conv_path, folded.eval())
        reference.set_submodule(bn_path, nn.Identity())
    return reference


def export_model(model: nn.Module, data: Dataset, out: str | Path, precision: str = "int8", *,
                 baseline: nn.Module | None = None, verify_split: str = "test", verify_limit: int | None = None,
                 calibration_batches: int = 8, calibration_batch_size: int = 64,
                 calibration_method: str = "minmax", activation_type: str = "uint8", int8_scope: str = "plan",
                 threads: int | None = None, bench: bool = True, seed: int = 0) -> ExportResult:
    """Export, verify against PyTorch and (with `bench`) time next to `baseline` exported in fp32."""
    _check_options(precision, calibration_batches, calibration_method, threads, int8_scope)
    model = model.eval().cpu()
    out = Path(out)
    written = write_onnx(model, data, out, precision, calibration_batches=calibration_batches,
                         calibration_batch_size=calibration_batch_size, calibration_method=calibration_method,
                         activation_type=activation_type, int8_scope=int8_scope, seed=seed)
    threads = threads or torch.get_num_threads()
    verification = verify(out, written.reference, data, verify_split, limit=verify_limit, seed=seed, threads=threads)
    result = ExportResult(path=out, precision=precision, file_bytes=out.stat().st_size,
                          size_bytes=profile(model, data.input_shape).size_bytes,
                          payload_bytes=payload_bytes(onnx.load_model(out)), verification=verification,
                          layer_precisions=written.precisions)
    if bench:
        result.speed["exported"] = benchmark(out, data.input_shape, threads=threads, seed=seed)
        if baseline is not None:
            with tempfile.TemporaryDirectory() as tmp:
                base_path = Path(tmp) / "baseline.onnx"
                to_onnx(copy.deepcopy(baseline), data.input_shape, base_path)
                result.speed["baseline"] = benchmark(base_path, data.input_shape, threads=threads, seed=seed)
    return result


def export_onnx(search_dir: str | Path, out: str | Path, precision: str = "int8", *, trial: int | None = None,
                max_size: int | None = None, min_ratio: float | None = None, max_drop: float | None = None,
                max_latency_ms: float | None = None,
                calibration_batches: int = 8, calibration_method: str = "minmax", activation_type: str = "uint8",
                int8_scope: str = "plan", verify_limit: int | None = None, threads: int | None = None,
                bench: bool = True, register: bool = True, registered_name: str | None = None,
                mlflow_uri: str | None = None, seed: int = 0) -> ExportResult:
    """Export a trial of the search at `search_dir` (by number, or the best one meeting the limits).

    The file is verified (ONNX Runtime vs PyTorch on the test split; ONNX accuracy on the split the
    search measured, next to the recorded figure), benchmarked next to the uncompressed model,
    logged to the trial's MLflow run and registered (with `register`; in `mlflow_uri` instead of the
    search's store if given), and described by a model card written beside it (`<out>.card.md`).
    If MLflow fails, the verified file and its card stay and TrackingFailed says how to retry.
    """
    _check_options(precision, calibration_batches, calibration_method, threads, int8_scope)
    if registered_name is not None:
        check_registered_name(registered_name)
    if trial is not None and any(v is not None for v in (max_size, min_ratio, max_drop, max_latency_ms)):
        raise AutorankError("give either a trial number or limits (max size / min ratio / max drop / max latency), "
                            "not both")
    out = Path(out)
    if out.suffix != ".onnx":
        raise AutorankError(f"output {out} should end in .onnx")
    rebuilt = rebuild_trial(search_dir, trial=trial, max_size=max_size, min_ratio=min_ratio, max_drop=max_drop,
                            max_latency_ms=max_latency_ms)
    search, record, data = rebuilt.search, rebuilt.record, rebuilt.data
    if register and mlflow_uri is None and "mlflow_uri" not in search.info:
        raise AutorankError(f"the search at {search_dir} was not tracked in MLflow (no MlflowCallback): register "
                            "in a tracking server with --mlflow-uri, or export with --no-register")
    result = export_model(rebuilt.model, data, out, precision, baseline=rebuilt.pretrained, verify_limit=verify_limit,
                          calibration_batches=calibration_batches, calibration_method=calibration_method,
                          activation_type=activation_type, int8_scope=int8_scope, threads=threads, bench=bench,
                          seed=seed)
    result.trial, result.search_dir = record.number, Path(search_dir)
    result.recorded_accuracy = record.figures.get("accuracy")
    result.onnx_val_accuracy = onnx_accuracy(out, data, "val", threads=threads or torch.get_num_threads())
    failure = None
    if register:
        try:
            result.mlflow = register_model(result, search, record, registered_name=registered_name, uri=mlflow_uri)
        except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the verified file is kept
            failure = _innermost(exc)
    result.card = write_card(result, search, record, rebuilt.plan)
    if failure:
        raise TrackingFailed(
            f"{out} is written and verified (card {result.card}), but logging it to MLflow at "
            f"{mlflow_uri or search.info['mlflow_uri']} failed ({failure}); retry with --no-register, "
            "or with --mlflow-uri of a reachable tracking server")
    return result


def _innermost(exc: BaseException) -> str:
    """The innermost cause of a failure on one line (MLflow wraps a refused connection four levels deep)."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def figures(result: ExportResult) -> list[tuple[str, str]]:
    """The verified figures as (label, value) rows, for the CLI and the demo."""
    v = result.verification
    rows = [
        ("file", f"{result.path} ({result.precision})"),
        ("size", f"{result.file_bytes:,} B on disk ({result.payload_bytes:,} B of tensors), "
                 f"{result.size_bytes:,} B computed (file x{result.size_ratio:.3f})"),
        (f"{v.split} accuracy", f"ONNX {v.onnx_accuracy:.4f}, PyTorch {v.torch_accuracy:.4f} on {v.images:,} images"),
        ("agreement", f"top-1 {v.top1_agreement:.4f}, max |logit diff| {v.max_abs_error:.3g}"),
    ]
    if result.precision == "int8":
        rows.append(("int8 kernel", f"{result.host['int8_kernel']}; weights on {result.host['int8_weight_grid']}"))
    if result.accuracy_gap is not None:
        rows.append(("val accuracy", f"ONNX {result.onnx_val_accuracy:.4f}, search recorded "
                                     f"{result.recorded_accuracy:.4f} (gap {result.accuracy_gap:+.2f} points)"))
    for name, speed in result.speed.items():
        rows.append((f"speed {name}", f"{speed.latency_ms:.2f} ms at batch 1, {speed.throughput:,.0f} img/s at "
                                      f"batch {speed.batch_size} ({speed.threads} threads)"))
    if result.mlflow.get("version"):
        rows.append(("registry", f"{result.mlflow['name']} version {result.mlflow['version']}"))
    if result.card:
        rows.append(("model card", str(result.card)))
    return rows


def result_json(result: ExportResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
