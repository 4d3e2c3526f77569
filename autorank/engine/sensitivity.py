"""Per-layer sensitivity: the accuracy lost when only one layer is compressed.

`sensitivity_table(model, data)` compresses one searchable layer at a time (`compress(model,
Plan({name: LayerPlan(...)}))`, no fine-tuning) for every candidate — the layer kept whole at each
weight precision, and each decomposition method at a few rank levels at each precision for
decomposed layers — and measures the accuracy on a seeded, class-stratified subset of a split
(validation by default). Every candidate also records its size in bytes, MACs and parameters from
`compression.profile` (the modules under the layer's name): the table's records
(`compression.sensitivity.SensitivityTable`) are what the allocator adds up.

Drops are in accuracy points (100 x fraction) against the uncompressed model on the same images; the
"keep fp32" candidate (method none, fp32) is the model itself: drop 0 by definition, not evaluated.
A drop may be negative (noise of the subset). The table is JSON (`to_json`/`from_json`) so a search
can cache it. What a layer's candidates share is computed once per layer: the network's values before
the layer on the subset (each candidate runs only the graph from the layer on, `_Downstream`, where
torch.fx traces the model) and, with a data-aware fit, the layer's recorded input and output and their
moments (`compression.fit.RecordedLayer`); the same figures as full passes, about half the time on
ResNet-20. `sensitivity_table` runs in the calling process, one candidate after another; a caller that spreads or checkpoints the work (the search: per layer, over
Ray workers, written row by row) uses its parts: `plan_table` (validation, the subset, the reference
accuracy), `measure_layer` (one layer's candidates) and `TableJob.assemble`.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.node import Node, map_arg

from autorank.compression import (Candidate, LayerPlan, Plan, Profile, SensitivityTable, compress, find_layers, profile,
                                  resolve_plan)
from autorank.compression.fit import RecordedLayer
from autorank.compression.plan import ACTIVATIONS, CONV_METHODS, LINEAR_METHODS, METHODS, RankSpec
from autorank.compression.quantize import INT_BITS, PRECISIONS
from autorank.compression.ranks import full_ranks, resolve_rank, scaled_ranks
from autorank.data import Dataset
from autorank.engine.loops import evaluate, resolve_device
from autorank.errors import AutorankError

DEFAULT_METHODS = ("tucker2", "svd")
DEFAULT_LEVELS: tuple[RankSpec, ...] = (0.5, 0.25)  # parameter-retention ratios of the decomposition
DEFAULT_DECOMPOSED_PRECISIONS = ("int8", "int4")  # a decomposed fp32/fp16 layer rarely beats int8 kept whole
LayerChoices = tuple[Sequence[str], Sequence[str], Sequence[str]]  # (methods, precisions, decomposed precisions)


def _layer_cost(stats: Profile, name: str) -> tuple[int, int, int]:
    """(bytes, MACs, params) of the modules at or under `name`."""
    own = [lp for n, lp in stats.layers.items() if n == name or n.startswith(name + ".")]
    return sum(lp.size_bytes for lp in own), sum(lp.macs for lp in own), sum(lp.params for lp in own)


_MULTIPLE = re.compile(r"vbmf\*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)")


def evbmf_multiple(level: RankSpec) -> float | None:
    """'vbmf*2' -> 2.0: a rank level at a multiple of the layer's EVBMF ranks; anything else -> None."""
    match = _MULTIPLE.fullmatch(level) if isinstance(level, str) else None
    return float(match.group(1)) if match and float(match.group(1)) > 0 else None


def _level_plan(model: nn.Module, name: str, layer: nn.Module, method: str, level: RankSpec,
                evbmf: dict[str, tuple[int, ...]]) -> LayerPlan:
    """The resolved (integer-rank) layer plan of `method` at `level`; "vbmf*M" scales the EVBMF ranks
    (computed once per method in `evbmf`), any other level is a rank spec for `resolve_plan`."""
    multiple = evbmf_multiple(level)
    rank: RankSpec = level
    if multiple is not None:
        if method not in evbmf:
            evbmf[method] = resolve_rank(method, layer, "vbmf")
        rank = scaled_ranks(evbmf[method], full_ranks(method, tuple(layer.weight.shape)), multiple)
    return resolve_plan(model, Plan({name: LayerPlan(method, rank)})).layers[name]


def _layer_plans(model: nn.Module, name: str, layer: nn.Module, methods: Sequence[str], levels: Sequence[RankSpec],
                 precisions: Sequence[str], decomposed_precisions: Sequence[str]) -> list[tuple[LayerPlan, RankSpec]]:
    """The candidates of one layer besides "keep fp32": each precision kept whole, then each applicable
    method at each level (resolved to integer ranks; levels that would not shrink the layer or repeat
    an earlier rank are dropped) at each decomposed precision."""
    plans: list[tuple[LayerPlan, RankSpec]] = [(LayerPlan("none", None, p), None) for p in precisions if p != "fp32"]
    allowed = CONV_METHODS if isinstance(layer, nn.Conv2d) else LINEAR_METHODS
    evbmf: dict[str, tuple[int, ...]] = {}
    for method in (m for m in methods if m in allowed):
        seen: list[list[int]] = []
        for level in levels:
            resolved = _level_plan(model, name, layer, method, level, evbmf)
            if resolved.method == "none" or resolved.rank in seen:
                continue
            seen.append(resolved.rank)
            plans += [(LayerPlan(method, resolved.rank, p), level) for p in decomposed_precisions]
    return plans


def _check_options(methods: Sequence[str], levels: Sequence[RankSpec], precisions: Sequence[str],
                   decomposed_precisions: Sequence[str], activations: str, limit: int | None) -> None:
    bad = [m for m in methods if m not in METHODS or m == "none"]
    if bad:
        raise AutorankError(f"sensitivity methods {bad}: choose from {', '.join(m for m in METHODS if m != 'none')}")
    bad = [lv for lv in levels if isinstance(lv, str) and lv.startswith("vbmf*") and evbmf_multiple(lv) is None]
    if bad:
        raise AutorankError(f"sensitivity levels {bad}: a multiple of the EVBMF ranks is 'vbmf*M' with M > 0")
    bad = [p for p in (*precisions, *decomposed_precisions) if p not in PRECISIONS]
    if bad:
        raise AutorankError(f"sensitivity precisions {bad}: choose from {', '.join(PRECISIONS)}")
    if activations not in ACTIVATIONS:
        raise AutorankError(f"activations {activations!r}: choose from {', '.join(ACTIVATIONS)}")
    if limit is not None and limit < 1:
        raise AutorankError("sensitivity images must be >= 1")


@dataclass
class TableJob:
    """A validated table, ready to measure layer by layer: what each measurement needs (it pickles, so a
    Ray task receives it whole) and what the finished table records besides the rows."""

    model: nn.Module
    subset: Dataset  # only `split`, cut to the stratified images
    split: str
    planned: dict[str, list[tuple[LayerPlan, RankSpec]]]  # layer -> its candidates besides keep fp32
    activations: str
    calibration: list[Tensor] | None
    options: dict[str, Any]  # compress_options
    reference: float  # the uncompressed model on the subset
    base: Profile  # the uncompressed model's profile
    input_shape: tuple[int, ...]
    batch_size: int
    device: str
    n_iter_max: int
    seed: int
    settings: dict[str, Any]

    def keep(self, name: str) -> Candidate:
        """The layer's "keep fp32" candidate: the uncompressed model itself (drop 0, not evaluated)."""
        size, macs, params = _layer_cost(self.base, name)
        return Candidate("none", None, "fp32", None, size, macs, params, self.reference, 0.0)

    def assemble(self, rows: Mapping[str, list[Candidate]], seconds: float) -> SensitivityTable:
        """The table from every layer's measured candidates (`measure_layer`), in the job's layer order."""
        missing = [name for name in self.planned if name not in rows]
        if missing:
            raise AutorankError(f"sensitivity table: layers {missing} were not measured")
        layers = {name: list(rows[name]) for name in self.planned}
        return SensitivityTable(
            layers=layers, reference_accuracy=self.reference, model_bytes=self.base.size_bytes,
            model_macs=self.base.macs, fixed_bytes=self.base.size_bytes - sum(c[0].size_bytes for c in layers.values()),
            fixed_macs=self.base.macs - sum(c[0].macs for c in layers.values()), activations=self.activations,
            split=self.split, images=len(self.subset.split(self.split)[1]), seed=self.seed, seconds=seconds,
            settings=self.settings)


def plan_table(
    model: nn.Module,
    data: Dataset,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    levels: Sequence[RankSpec] = DEFAULT_LEVELS,
    precisions: Sequence[str] = PRECISIONS,
    decomposed_precisions: Sequence[str] = DEFAULT_DECOMPOSED_PRECISIONS,
    layers: Mapping[str, LayerChoices] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_first: bool = True,
    activations: str = "fp32",
    calibration: Iterable[Tensor] | None = None,
    split: str = "val",
    limit: int | None = 1000,
    seed: int = 0,
    batch_size: int = 512,
    device: str = "auto",
    n_iter_max: int = 100,
    compress_options: Mapping[str, Any] | None = None,
) -> TableJob:
    """Validate the options, resolve every layer's candidates and measure the uncompressed model on
    the stratified subset: everything before the per-layer measurements (arguments as for
    `sensitivity_table`). `layers` names the layers exactly, each with its own (methods, precisions,
    decomposed precisions), instead of include/exclude globs and the global choices."""
    if layers is None:
        found = find_layers(model, include, exclude, skip_first)
        choices: dict[str, LayerChoices] = {name: (methods, precisions, decomposed_precisions) for name in found}
    else:
        every = find_layers(model, skip_first=False)
        unknown = [name for name in layers if name not in every]
        if unknown:
            raise AutorankError(f"sensitivity table: {unknown} are not compressible layers of the model")
        found, choices = {name: every[name] for name in layers}, dict(layers)
    for own_methods, own_precisions, own_decomposed in [(methods, precisions, decomposed_precisions),
                                                        *choices.values()]:
        _check_options(own_methods, levels, own_precisions, own_decomposed, activations, limit)
    if not found:
        raise AutorankError("sensitivity table: no layers to compress (check include/exclude)")
    planned = {}
    for name, layer in found.items():  # validates every level before any measurement
        own_methods, own_precisions, own_decomposed = choices[name]
        planned[name] = _layer_plans(model, name, layer, own_methods, levels, own_precisions, own_decomposed)
    quantized = any(lp.precision in INT_BITS for plans in planned.values() for lp, _ in plans)
    if activations == "int8" and quantized and calibration is None:
        calibration = data.calibration_images(512, min(batch_size, 512), seed=seed)
    subset = data.sample(split, limit, seed=seed)
    options = dict(compress_options or {})
    settings = {"methods": list(methods), "levels": list(levels), "precisions": list(precisions),
                "decomposed_precisions": list(decomposed_precisions), "n_iter_max": n_iter_max,
                "compress_options": sorted(options)}
    if layers is not None:
        settings["layers"] = {name: [list(part) for part in choice] for name, choice in choices.items()}
    return TableJob(model=model, subset=subset, split=split, planned=planned, activations=activations,
                    calibration=list(calibration) if calibration is not None else None, options=options,
                    reference=evaluate(model, subset, split, batch_size=batch_size, device=device),
                    base=profile(model, data.input_shape), input_shape=tuple(data.input_shape),
                    batch_size=batch_size, device=device, n_iter_max=n_iter_max, seed=seed, settings=settings)


class _Downstream:
    """Accuracy on the job's subset of models that differ from the job's model only at one layer: the
    values that cross into the model's graph at that layer (its input, a residual branch's input) are
    recorded once, and each candidate runs only the graph from the layer on. The same operations on the
    same tensors as a full pass: the same accuracy at a fraction of the cost for late layers."""

    def __init__(self, nodes: list[Node], start: int, recorded: list[tuple[dict[Node, Tensor], Tensor]],
                 target: torch.device):
        self.nodes, self.start, self.recorded, self.target = nodes, start, recorded, target
        self.last_use = {n: max(nodes.index(u) for u in n.users) for n in nodes if n.users}

    @classmethod
    def record(cls, job: TableJob, name: str) -> _Downstream | None:
        """None where torch.fx cannot trace the model or the layer is not called exactly once."""
        try:
            graph = torch.fx.symbolic_trace(job.model).graph
        except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow and many custom modules
            return None
        nodes = list(graph.nodes)
        uses = [i for i, n in enumerate(nodes) if n.op in ("call_module", "get_attr")
                and (n.target == name or n.target.startswith(name + "."))]
        if len(uses) != 1 or nodes[uses[0]].target != name:
            return None
        start = uses[0]
        target = resolve_device(job.device)
        downstream = cls(nodes, start, [], target)
        later = set(nodes[start:])
        crossing = [n for n in nodes[:start] if any(u in later for u in n.users)]
        job.model.to(target).eval()
        with torch.inference_mode():
            for x, y in job.subset.batches(job.split, job.batch_size, device=target):
                env = downstream._run(job.model, 0, start, {n: x for n in nodes if n.op == "placeholder"})
                downstream.recorded.append(({n: env[n] for n in crossing}, y))
        return downstream

    def accuracy(self, model: nn.Module) -> float:
        was_training = model.training
        model.to(self.target).eval()
        correct = seen = 0
        try:
            with torch.inference_mode():
                for crossing, y in self.recorded:
                    logits = self._run(model, self.start, len(self.nodes), dict(crossing))[self.nodes[-1]]
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
        finally:
            model.train(was_training)
        return correct / seen

    def _run(self, model: nn.Module, begin: int, end: int, env: dict[Node, Any]) -> dict[Node, Any]:
        """Execute nodes[begin:end] of the graph on `model`'s modules; a value is dropped after its last
        use unless a later node (past `end`) reads it."""
        for i in range(begin, end):
            node = self.nodes[i]
            if node.op != "placeholder":
                args, kwargs = map_arg((node.args, node.kwargs), lambda n: env[n])
                if node.op == "call_module":
                    env[node] = model.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "get_attr":
                    env[node] = functools.reduce(getattr, node.target.split("."), model)
                else:  # output
                    env[node] = args[0]
            for used in node.all_input_nodes:
                if self.last_use[used] == i:
                    del env[used]
        return env


def measure_layer(job: TableJob, name: str, *, factors: dict | None = None,
                  progress: Callable[[str, Candidate], None] | None = None) -> list[Candidate]:
    """One layer's row: keep fp32, then each candidate measured with only this layer compressed.
    `factors`: compress's cache of weight-space chains (a search shares it with its trials). What every
    candidate of the layer shares is computed once: the layer's input and output on the fit images (a
    data-aware fit's moments) and the network's values before the layer on the subset (`_Downstream`)."""
    row = [job.keep(name)]
    options = dict(job.options)
    if options.get("fit") is not None and any(lp.method != "none" or lp.precision in INT_BITS
                                              for lp, _ in job.planned[name]):
        options["fit"] = RecordedLayer(job.model.to(resolve_device(job.device)), name, options["fit"])
    downstream = _Downstream.record(job, name)
    for lp, level in job.planned[name]:
        compressed = compress(job.model, Plan({name: lp}, job.activations), calibration=job.calibration,
                              n_iter_max=job.n_iter_max, seed=job.seed, factors=factors, **options)
        if downstream is not None:
            accuracy = downstream.accuracy(compressed)
        else:
            accuracy = evaluate(compressed, job.subset, job.split, batch_size=job.batch_size, device=job.device)
        size, macs, params = _layer_cost(profile(compressed, job.input_shape), name)
        cand = Candidate(lp.method, lp.rank, lp.precision, level, size, macs, params, accuracy,
                         100.0 * (job.reference - accuracy))
        row.append(cand)
        if progress is not None:
            progress(name, cand)
    return row


def sensitivity_table(
    model: nn.Module,
    data: Dataset,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    levels: Sequence[RankSpec] = DEFAULT_LEVELS,
    precisions: Sequence[str] = PRECISIONS,
    decomposed_precisions: Sequence[str] = DEFAULT_DECOMPOSED_PRECISIONS,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_first: bool = True,
    activations: str = "fp32",
    calibration: Iterable[Tensor] | None = None,
    split: str = "val",
    limit: int | None = 1000,
    seed: int = 0,
    batch_size: int = 512,
    device: str = "auto",
    n_iter_max: int = 100,
    compress_options: Mapping[str, Any] | None = None,
    progress: Callable[[str, Candidate], None] | None = None,
) -> SensitivityTable:
    """Accuracy drop (points) and size/MACs of every candidate of every searchable layer, each measured
    with only that layer compressed, no fine-tuning, on `limit` stratified images of `split` (seeded).

    Candidates per layer: keep fp32 (the reference, drop 0); kept whole at each of `precisions`; each of
    `methods` that applies to the layer (cp/tucker2/tt for convs, svd for linear layers) at each of
    `levels` (rank specs: retention ratios, "vbmf", "vbmf:W", integers, or "vbmf*M": M times the
    layer's EVBMF ranks) at each of `decomposed_precisions`. `activations="int8"` measures every
    candidate with calibrated int8 activations at its int8/int4 layers (`calibration`: batches of
    inputs, by default 512 seeded training images). `compress_options` go to `compress` unchanged (e.g.
    data-aware fitting); `progress` is called with (layer name, candidate) after each measurement. Runs
    in this process, one candidate after another.
    """
    start = time.perf_counter()
    job = plan_table(model, data, methods=methods, levels=levels, precisions=precisions,
                     decomposed_precisions=decomposed_precisions, include=include, exclude=exclude,
                     skip_first=skip_first, activations=activations, calibration=calibration, split=split,
                     limit=limit, seed=seed, batch_size=batch_size, device=device, n_iter_max=n_iter_max,
                     compress_options=compress_options)
    rows = {name: measure_layer(job, name, progress=progress) for name in job.planned}
    return job.assemble(rows, time.perf_counter() - start)
