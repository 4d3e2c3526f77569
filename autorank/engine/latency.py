"""Measured ONNX Runtime latency of compression plans: a lookup table of layer blocks, per machine and model.

FLOPs and parameter counts do not predict CPU latency for chains of small convs, so the search
measures. Each distinct layer configuration (layer, method, ranks, precision; a decomposed chain
as one block) is lowered to a small ONNX graph and timed once in ONNX Runtime at the configured
thread count, at batch 1 and at a throughput batch. The untouched remainder of the network (stem,
adds, pooling, ...) is the uncompressed fp32 model's measured time minus its layers' fp32 blocks.
A plan's latency is then the remainder plus its layers' blocks, with no new timing for
configurations already in the table; the table is a JSON file reused across trials and searches on
the same machine and model.

Blocks are lowered as export lowers layers: float convs for fp32/fp16 layers (fp16 layers of an
int8 file compute in fp32), and for int8/int4 layers QuantizeLinear/DequantizeLinear on every
conv's input and output with per-channel integer weights and int32 biases, which ONNX Runtime
fuses into QLinearConv (int8) as in the exported file. A layer run recomposed (`LayerPlan.run`) is
timed as the file runs it: one float op of the layer's geometry, behind a QuantizeLinear /
DequantizeLinear pair when its input is int8; that block depends on the layer alone, so every method
and rank shares it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from autorank.compression import LayerPlan, Plan, SensitivityTable, find_layers, resolve_plan
from autorank.compression.methods import build_chain
from autorank.compression.quantize import INT_BITS, QMAX
from autorank.engine.deploy import INPUT_NAME, OPSET, onnx_session, to_onnx
from autorank.data.sources import default_cache_dir
from autorank.errors import AutorankError

BLOCK_INPUT = "x"


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one forward pass at batch 1 and at the table's throughput batch."""

    b1_ms: float
    batch_ms: float


@dataclass(frozen=True)
class LatencyPrediction:
    b1_ms: float        # predicted ONNX Runtime latency at batch 1
    throughput: float   # predicted images per second at the table's batch size


def machine_key(threads: int) -> str:
    """What a timing depends on besides the model: CPU, ONNX Runtime version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()} | {cpu} | onnxruntime {ort.__version__} | {threads} threads"


def default_path(model_key: str, input_shape: tuple[int, ...], threads: int) -> Path:
    """Where a model's table lives on this machine: one JSON file per machine, model, input shape (the
    same model at another resolution times differently) and thread count."""
    machine = hashlib.sha256(machine_key(threads).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    return default_cache_dir() / "latency" / f"{safe}-{'x'.join(map(str, input_shape))}-{machine}.json"


def _median_ms(session: ort.InferenceSession, name: str, x: np.ndarray, runs: int, seconds: float) -> float:
    for _ in range(2):
        session.run(None, {name: x})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _ops(chain: list[nn.Module]) -> list[nn.Module]:
    return [m for m in chain if isinstance(m, nn.Conv2d | nn.Linear)]


def block_graph(chain: list[nn.Module], precision: str, *, rounded_input: bool = False) -> onnx.ModelProto:
    """One layer's chain as an ONNX graph: float ops, or QDQ around every op for int8/int4.

    The last op carries a bias (a BatchNorm folds into it in the exported file). `rounded_input`
    (float ops only): the input passes QuantizeLinear/DequantizeLinear first, as a recomposed int8
    layer's does in the exported file.
    """
    nodes, inits = [], []
    integer = precision in INT_BITS
    name = BLOCK_INPUT
    if integer or rounded_input:  # one activation grid for all: timing does not depend on values
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), "a_zero")]
        nodes.append(helper.make_node("QuantizeLinear", [name, "a_scale", "a_zero"], ["q0"]))
    if rounded_input and not integer:  # per channel, as export writes it (precision.quantize_inputs)
        channels = _ops(chain)[0].weight.shape[1]
        inits += [numpy_helper.from_array(np.full(channels, 0.05, np.float32), "a_scales"),
                  numpy_helper.from_array(np.full(channels, 128, np.uint8), "a_zeros")]
        nodes.append(helper.make_node("DequantizeLinear", ["q0", "a_scales", "a_zeros"], ["x_rounded"], axis=1))
        name = "x_rounded"
    ops = _ops(chain)
    for i, op in enumerate(ops):
        weight = op.weight.detach().float().numpy()
        bias = np.zeros(weight.shape[0], np.float32)
        if integer:
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", "a_scale", "a_zero"], [f"x{i}"]))
            name = f"x{i}"
            absmax = np.abs(weight.reshape(weight.shape[0], -1)).max(1)
            scale = np.where(absmax > 0, absmax / QMAX[precision], 1.0).astype(np.float32)
            q = np.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1)))
            kind = TensorProto.INT4 if precision == "int4" else TensorProto.INT8
            inits += [helper.make_tensor(f"w{i}_q", kind, weight.shape, q.astype(np.int8).flatten().tolist()),
                      numpy_helper.from_array(scale, f"w{i}_scale"),
                      numpy_helper.from_array(np.zeros(weight.shape[0], np.int32), f"b{i}_q"),
                      numpy_helper.from_array((scale * np.float32(0.05)).astype(np.float32), f"b{i}_scale")]
            nodes += [helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale"], [f"w{i}"], axis=0),
                      helper.make_node("DequantizeLinear", [f"b{i}_q", f"b{i}_scale"], [f"b{i}"], axis=0)]
        else:
            inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = f"y{i}"
        if isinstance(op, nn.Conv2d):
            pads = [op.padding[0], op.padding[1]] * 2
            nodes.append(helper.make_node("Conv", [name, f"w{i}", f"b{i}"], [out], strides=list(op.stride),
                                          pads=pads, dilations=list(op.dilation), group=op.groups,
                                          kernel_shape=list(op.kernel_size)))
        else:
            nodes.append(helper.make_node("Gemm", [name, f"w{i}", f"b{i}"], [out], transB=1))
        if integer:
            nodes.append(helper.make_node("QuantizeLinear", [out, "a_scale", "a_zero"], [f"q{i + 1}"]))
        name = out
    if integer:
        nodes.append(helper.make_node("DequantizeLinear", [f"q{len(ops)}", "a_scale", "a_zero"], ["out"]))
    else:
        nodes.append(helper.make_node("Identity", [name], ["out"]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info(BLOCK_INPUT, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


class LatencyTable:
    """ONNX Runtime timings of layer configurations of one model on this machine, cached in `path`.

    `measured` counts the timings this instance ran (a plan whose configurations are all in the
    table costs none). A file written for another machine, thread count, model or input shape is
    started afresh; an unreadable one (a hand edit, a full disk) too, with a warning, rather than
    failing every later search. Several tables may share the file (concurrent searches): each save merges the entries
    others wrote since, and replaces the file atomically from a temporary file of its own (two saves
    at the same instant may still drop one's newest entries from the file: they are timed again later,
    never wrong).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, model_key: str,
                 threads: int = 2, batch_size: int = 128, seconds: float = 0.2, runs: int = 10) -> None:
        if threads < 1 or batch_size < 1:
            raise AutorankError(f"latency table: threads and batch size must be >= 1, got {threads}, {batch_size}")
        self.model, self.input_shape, self.path = model.eval(), tuple(input_shape), Path(path)
        self.threads, self.batch_size, self.seconds, self.runs = threads, batch_size, seconds, runs
        self.layers = find_layers(model, skip_first=False)
        self.header = {"machine": machine_key(threads), "model": model_key, "input_shape": list(self.input_shape),
                       "batch_size": batch_size,
                       "layers": {name: list(layer.weight.shape) for name, layer in self.layers.items()}}
        self.measured = 0
        self.entries: dict[str, Timing] = self._read()
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _input_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            shapes: dict[str, tuple[int, ...]] = {}
            handles = [layer.register_forward_hook(
                lambda _m, inputs, _out, name=name: shapes.__setitem__(name, tuple(inputs[0].shape[1:])))
                for name, layer in self.layers.items()]
            param = next(self.model.parameters())
            try:
                with torch.no_grad():
                    self.model(torch.zeros(1, *self.input_shape, device=param.device, dtype=param.dtype))
            finally:
                for handle in handles:
                    handle.remove()
            self._shapes = shapes
        return self._shapes

    def _read(self, warn: bool = True) -> dict[str, Timing]:
        """The file's entries if it was written for this header; none if it is missing, for another
        header, or unreadable (warned once, when the table opens it)."""
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("header") != self.header:
                return {}
            return {key: Timing(**value) for key, value in saved["entries"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if warn:
                warnings.warn(f"latency table {self.path} is unreadable ({type(exc).__name__}: {exc}); "
                              "measuring afresh and rewriting it", RuntimeWarning, stacklevel=3)
            return {}

    def _save(self) -> None:
        """Merge what other tables saved to the file since (this table's own timings win), then
        replace the file with a uniquely named temporary one: a concurrent writer never sees a
        half-written file, and never shares a temporary name."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = {**self._read(warn=False), **self.entries}
        data = {"header": self.header, "entries": {k: vars(v) for k, v in sorted(self.entries.items())}}
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp",
                                         delete=False) as tmp:
            tmp.write(json.dumps(data, indent=1))
        try:
            os.replace(tmp.name, self.path)
        except OSError:
            Path(tmp.name).unlink(missing_ok=True)
            raise

    def _time(self, model: onnx.ModelProto | Path, input_name: str, shape: tuple[int, ...]) -> Timing:
        session = (onnx_session(model, self.threads) if isinstance(model, Path) else
                   ort.InferenceSession(model.SerializeToString(), self._options(), providers=["CPUExecutionProvider"]))
        rng = np.random.default_rng(0)
        one = rng.standard_normal((1, *shape), dtype=np.float32)
        many = rng.standard_normal((self.batch_size, *shape), dtype=np.float32)
        self.measured += 1
        return Timing(_median_ms(session, input_name, one, self.runs, self.seconds),
                      _median_ms(session, input_name, many, 3, self.seconds))

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.log_severity_level = 3
        return options

    def block(self, name: str, method: str, ranks: list[int] | None, precision: str, run: str = "chain") -> Timing:
        """The timing of one layer configuration (measured now only if not in the table).

        A recomposed layer (`run`) is one float op of the layer's geometry whatever its method and ranks:
        the layer's fp32 block, or with an integer `precision` (int8 activations) that op behind a
        rounded input, one entry per layer (`name|recomposed|<precision>`)."""
        if run == "recomposed" and precision not in INT_BITS:
            return self.block(name, "none", None, "fp32")
        recomposed = run == "recomposed"
        key = f"{name}|recomposed|{precision}" if recomposed else \
            f"{name}|{method}|{'x'.join(map(str, ranks or []))}|{precision}"
        if key not in self.entries:
            layer, shape = self.layers[name], self._input_shapes()[name]
            chain = [layer] if method == "none" or recomposed else list(build_chain(layer, method, tuple(ranks)))
            graph = block_graph(chain, "fp32", rounded_input=True) if recomposed else block_graph(chain, precision)
            raw = self._time(graph, BLOCK_INPUT, shape)
            overhead = self._overhead(shape)
            self.entries[key] = Timing(max(raw.b1_ms - overhead.b1_ms, 0.0), max(raw.batch_ms - overhead.batch_ms, 0.0))
            self._save()
        return self.entries[key]

    def _overhead(self, shape: tuple[int, ...]) -> Timing:
        """What timing a block alone costs that the whole model does not pay per layer: the call into
        ONNX Runtime and copying the block's input and output (megabytes at the throughput batch).
        Measured with an Identity graph of the same input shape and subtracted from each block."""
        key = f"overhead|{'x'.join(map(str, shape))}"
        if key not in self.entries:
            graph = helper.make_graph([helper.make_node("Identity", [BLOCK_INPUT], ["out"])], "overhead",
                                      [helper.make_tensor_value_info(BLOCK_INPUT, TensorProto.FLOAT, None)],
                                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
            self.entries[key] = self._time(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]),
                                           BLOCK_INPUT, shape)
        return self.entries[key]

    def remainder(self) -> Timing:
        """Everything but the candidate layers: the fp32 model's time minus its layers' fp32 blocks."""
        if "remainder" not in self.entries:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                to_onnx(copy.deepcopy(self.model), self.input_shape, path)
                whole = self._time(path, INPUT_NAME, self.input_shape)
            blocks = [self.block(name, "none", None, "fp32") for name in self.layers]
            self.entries["remainder"] = Timing(max(whole.b1_ms - sum(b.b1_ms for b in blocks), 0.0),
                                               max(whole.batch_ms - sum(b.batch_ms for b in blocks), 0.0))
            self._save()
        return self.entries["remainder"]

    def _layer(self, name: str, lp: LayerPlan | None, activations: str) -> Timing:
        """A layer's block as the file runs it: integer layers with float activations (weight-only int8)
        dequantize their weights and compute in float, as fp32."""
        if lp is None:
            return self.block(name, "none", None, "fp32")
        compute = lp.precision if activations == "int8" or lp.precision not in INT_BITS else "fp32"
        return self.block(name, lp.method, lp.rank, compute, lp.run)

    def predict(self, plan: Plan) -> LatencyPrediction:
        """A plan's ONNX Runtime latency (batch 1) and throughput, from the table plus the remainder."""
        resolved = resolve_plan(self.model, plan)
        total = self.remainder()
        b1, batch = total.b1_ms, total.batch_ms
        for name in self.layers:
            timing = self._layer(name, resolved.layers.get(name), plan.activations)
            b1, batch = b1 + timing.b1_ms, batch + timing.batch_ms
        return LatencyPrediction(b1, self.batch_size / batch * 1000)

    def candidate_costs(self, table: SensitivityTable) -> tuple[dict[str, list[float]], float]:
        """Batch-1 milliseconds of each sensitivity-table candidate, and of everything else (the
        remainder and the layers the table leaves fp32): what `compression.allocate` budgets with."""
        costs = {name: [self._layer(name, c.layer_plan(), table.activations).b1_ms for c in cands]
                 for name, cands in table.layers.items()}
        fixed = self.remainder().b1_ms + sum(self._layer(name, None, "fp32").b1_ms
                                             for name in self.layers if name not in table.layers)
        return costs, fixed
