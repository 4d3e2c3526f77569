"""Per-layer sensitivity: the accuracy lost when only one layer is compressed.

`sensitivity_table(model, data)` compresses one searchable layer at a time (`compress(model,
Plan({name: LayerPlan(...)}))`, no fine-tuning) for every candidate — the layer kept whole at each
weight precision, and each decomposition method at a few rank levels at each precision for
decomposed layers — and measures the accuracy on a seeded, class-stratified subset of a split
(validation by default). Every candidate also records its size in bytes, MACs and parameters from
`compression.profile` (the modules under the layer's name), so that the size of any combination is
`fixed_bytes + sum(candidate sizes)` exactly, and the allocator (`allocator.py`) can add them up.

Drops are in accuracy points (100 x fraction) against the uncompressed model on the same images; the
"keep fp32" candidate (method none, fp32) is the model itself: drop 0 by definition, not evaluated.
A drop may be negative (noise of the subset). The table is JSON (`to_json`/`from_json`) so a search
can cache it. It runs in the calling process, one candidate after another (no Ray spreading yet);
evaluation is ~97% of its time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from autorank.data import Dataset
from autorank.engine import evaluate
from autorank.errors import AutorankError

from .accounting import Profile, profile
from .apply import compress, resolve_plan
from .layers import find_layers
from .plan import ACTIVATIONS, CONV_METHODS, LINEAR_METHODS, METHODS, LayerPlan, Plan, RankSpec
from .quantize import INT_BITS, PRECISIONS

TABLE_FORMAT = 1
DEFAULT_METHODS = ("tucker2", "svd")
DEFAULT_LEVELS: tuple[RankSpec, ...] = (0.5, 0.25)  # parameter-retention ratios of the decomposition
DEFAULT_DECOMPOSED_PRECISIONS = ("int8", "int4")  # a decomposed fp32/fp16 layer rarely beats int8 kept whole


@dataclass
class Candidate:
    """One way to compress one layer, and what it costs when only that layer is compressed."""

    method: str
    rank: list[int] | None  # resolved integer ranks (None for method none)
    precision: str
    level: RankSpec  # the rank spec that gave `rank` (a retention ratio, "vbmf:W", ...); None for none
    size_bytes: int  # the layer (its chain, activation quantizers included) under compression.profile
    macs: int
    params: int
    accuracy: float  # on the table's images, with only this layer compressed
    drop: float  # accuracy points below the uncompressed model on the same images (may be < 0)

    @property
    def label(self) -> str:
        ranks = f"[{','.join(map(str, self.rank))}]" if self.rank else ""
        return f"{self.method}{ranks}/{self.precision}"

    @property
    def kind(self) -> str:
        """The candidate's column in a table: method, level and precision (ranks differ per layer)."""
        return f"{self.method}/{self.precision}" if self.method == "none" else \
            f"{self.method}@{self.level}/{self.precision}"

    def layer_plan(self) -> LayerPlan:
        return LayerPlan(self.method, list(self.rank) if self.rank else None, self.precision)

    def matches(self, lp: LayerPlan) -> bool:
        rank = list(lp.rank) if isinstance(lp.rank, list | tuple) else lp.rank
        return (lp.method, lp.precision) == (self.method, self.precision) and (rank or None) == self.rank


@dataclass
class Prediction:
    """What a table predicts for a plan: the sum of its layers' drops (points), its size and MACs."""

    drop: float
    size_bytes: int
    macs: int


@dataclass
class SensitivityTable:
    """Per layer (module name) its candidates; the first is always "keep fp32" (none/fp32, drop 0)."""

    layers: dict[str, list[Candidate]]
    reference_accuracy: float  # the uncompressed model on the table's images
    model_bytes: int  # the uncompressed model (compression.profile)
    model_macs: int
    fixed_bytes: int  # everything outside the table's layers (stem, BatchNorm, ...): no plan changes it
    fixed_macs: int
    activations: str = "fp32"  # the Plan.activations every candidate was measured with
    split: str = "val"
    images: int = 0  # size of the stratified subset
    seed: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # methods, levels, precisions, ... (for the record)

    def reference(self, name: str) -> Candidate:
        return self.layers[name][0]

    def candidate(self, name: str, lp: LayerPlan) -> Candidate:
        if name not in self.layers:
            raise AutorankError(f"layer {name!r} is not in the sensitivity table")
        for cand in self.layers[name]:
            if cand.matches(lp):
                return cand
        raise AutorankError(f"layer {name!r}: {lp.method} {lp.rank} {lp.precision} is not a candidate of the "
                            "sensitivity table")

    def predict(self, plan: Plan) -> Prediction:
        """Predicted drop (sum of the per-layer drops, negative ones counted as 0), exact size and MACs
        of `plan` (layers it leaves out count as kept fp32; every layer it names must be a candidate)."""
        chosen = {name: self.reference(name) for name in self.layers}
        for name, lp in plan.layers.items():
            chosen[name] = self.candidate(name, lp)
        return Prediction(sum(max(c.drop, 0.0) for c in chosen.values()),
                          self.fixed_bytes + sum(c.size_bytes for c in chosen.values()),
                          self.fixed_macs + sum(c.macs for c in chosen.values()))

    def to_json(self) -> str:
        raw = asdict(self)
        raw["format"] = TABLE_FORMAT
        return json.dumps(raw, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        try:
            raw = json.loads(text)
            if raw.pop("format", None) != TABLE_FORMAT:
                raise AutorankError(f"sensitivity table: expected format {TABLE_FORMAT}")
            raw["layers"] = {n: [Candidate(**c) for c in cands] for n, cands in raw["layers"].items()}
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise AutorankError(f"not a sensitivity table: {exc}") from None

    def format(self) -> str:
        """A text matrix: one row per layer, one column per candidate kind; cells = drop in points."""
        kinds = list(dict.fromkeys(c.kind for cands in self.layers.values() for c in cands))
        width = max(map(len, kinds)) + 1
        name_width = max(map(len, self.layers), default=5) + 2
        lines = [f"{'layer':<{name_width}}{'fp32 B':>9}" + "".join(f"{k:>{width}}" for k in kinds)]
        for name, cands in self.layers.items():
            by_kind = {c.kind: c for c in cands}
            cells = "".join(f"{by_kind[k].drop:>{width}.2f}" if k in by_kind else f"{'-':>{width}}" for k in kinds)
            lines.append(f"{name:<{name_width}}{cands[0].size_bytes:>9,}{cells}")
        lines.append(f"drop in accuracy points vs {100 * self.reference_accuracy:.2f}% on {self.images:,} "
                     f"{self.split} images (stratified, seed {self.seed}); {self.seconds:.1f} s")
        return "\n".join(lines)


def _layer_cost(stats: Profile, name: str) -> tuple[int, int, int]:
    """(bytes, MACs, params) of the modules at or under `name`."""
    own = [lp for n, lp in stats.layers.items() if n == name or n.startswith(name + ".")]
    return sum(lp.size_bytes for lp in own), sum(lp.macs for lp in own), sum(lp.params for lp in own)


def _layer_plans(model: nn.Module, name: str, layer: nn.Module, methods: Sequence[str], levels: Sequence[RankSpec],
                 precisions: Sequence[str], decomposed_precisions: Sequence[str]) -> list[tuple[LayerPlan, RankSpec]]:
    """The candidates of one layer besides "keep fp32": each precision kept whole, then each applicable
    method at each level (resolved to integer ranks; levels that would not shrink the layer or repeat
    an earlier rank are dropped) at each decomposed precision."""
    plans: list[tuple[LayerPlan, RankSpec]] = [(LayerPlan("none", None, p), None) for p in precisions if p != "fp32"]
    allowed = CONV_METHODS if isinstance(layer, nn.Conv2d) else LINEAR_METHODS
    for method in (m for m in methods if m in allowed):
        seen: list[list[int]] = []
        for level in levels:
            resolved = resolve_plan(model, Plan({name: LayerPlan(method, level)})).layers[name]
            if resolved.method == "none" or resolved.rank in seen:
                continue
            seen.append(resolved.rank)
            plans += [(LayerPlan(method, resolved.rank, p), level) for p in decomposed_precisions]
    return plans


def _check_options(methods: Sequence[str], precisions: Sequence[str], decomposed_precisions: Sequence[str],
                   activations: str, limit: int | None) -> None:
    bad = [m for m in methods if m not in METHODS or m == "none"]
    if bad:
        raise AutorankError(f"sensitivity methods {bad}: choose from {', '.join(m for m in METHODS if m != 'none')}")
    bad = [p for p in (*precisions, *decomposed_precisions) if p not in PRECISIONS]
    if bad:
        raise AutorankError(f"sensitivity precisions {bad}: choose from {', '.join(PRECISIONS)}")
    if activations not in ACTIVATIONS:
        raise AutorankError(f"activations {activations!r}: choose from {', '.join(ACTIVATIONS)}")
    if limit is not None and limit < 1:
        raise AutorankError("sensitivity images must be >= 1")


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
    `levels` (rank specs: retention ratios, "vbmf", "vbmf:W", integers) at each of
    `decomposed_precisions`. `activations="int8"` measures every candidate with calibrated int8
    activations at its int8/int4 layers (`calibration`: batches of inputs, by default 512 seeded
    training images). `compress_options` go to `compress` unchanged (e.g. data-aware fitting); `progress`
    is called with (layer name, candidate) after each measurement. Runs in this process, one candidate
    after another.
    """
    _check_options(methods, precisions, decomposed_precisions, activations, limit)
    start = time.perf_counter()
    options = dict(compress_options or {})
    layers = find_layers(model, include, exclude, skip_first)
    if not layers:
        raise AutorankError("sensitivity table: no layers to compress (check include/exclude)")
    planned = {name: _layer_plans(model, name, layer, methods, levels, precisions, decomposed_precisions)
               for name, layer in layers.items()}  # validates every level before any measurement
    quantized = any(lp.precision in INT_BITS for plans in planned.values() for lp, _ in plans)
    if activations == "int8" and quantized and calibration is None:
        calibration = data.calibration_images(512, min(batch_size, 512), seed=seed)
    calibration = list(calibration) if calibration is not None else None
    subset = data.sample(split, limit, seed=seed)
    reference = evaluate(model, subset, split, batch_size=batch_size, device=device)
    base = profile(model, data.input_shape)
    table: dict[str, list[Candidate]] = {}
    for name, plans in planned.items():
        size, macs, params = _layer_cost(base, name)
        table[name] = [Candidate("none", None, "fp32", None, size, macs, params, reference, 0.0)]
        for lp, level in plans:
            compressed = compress(model, Plan({name: lp}, activations), calibration=calibration,
                                  n_iter_max=n_iter_max, seed=seed, **options)
            accuracy = evaluate(compressed, subset, split, batch_size=batch_size, device=device)
            size, macs, params = _layer_cost(profile(compressed, data.input_shape), name)
            cand = Candidate(lp.method, lp.rank, lp.precision, level, size, macs, params, accuracy,
                             100.0 * (reference - accuracy))
            table[name].append(cand)
            if progress is not None:
                progress(name, cand)
    settings = {"methods": list(methods), "levels": list(levels), "precisions": list(precisions),
                "decomposed_precisions": list(decomposed_precisions), "n_iter_max": n_iter_max,
                "compress_options": sorted(options)}
    return SensitivityTable(
        layers=table, reference_accuracy=reference, model_bytes=base.size_bytes, model_macs=base.macs,
        fixed_bytes=base.size_bytes - sum(c[0].size_bytes for c in table.values()),
        fixed_macs=base.macs - sum(c[0].macs for c in table.values()), activations=activations, split=split,
        images=len(subset.split(split)[1]), seed=seed, seconds=time.perf_counter() - start, settings=settings)
