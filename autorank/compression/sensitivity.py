"""The per-layer sensitivity table: per layer its candidates, each with the accuracy lost when only that
layer is compressed, and what it costs.

The table is measured by `autorank.engine.sensitivity_table` (evaluation is the engine's); here are its
records. Every candidate records its size in bytes, MACs and parameters from `compression.profile`
(the modules under the layer's name), so that the size of any combination is
`fixed_bytes + sum(candidate sizes)` exactly, and the allocator (`allocator.py`) can add them up.
Drops are in accuracy points (100 x fraction) against the uncompressed model on the same images; the
"keep fp32" candidate (method none, fp32) is the model itself: drop 0 by definition, not evaluated.
A drop may be negative (noise of the subset). The table is JSON (`to_json`/`from_json`) so a search
can cache it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from autorank.errors import AutorankError

from .plan import LayerPlan, Plan, RankSpec

TABLE_FORMAT = 1


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
    run: str = "chain"  # LayerPlan.run; measured tables hold chains, `with_recomposed` adds the other run

    @property
    def label(self) -> str:
        ranks = f"[{','.join(map(str, self.rank))}]" if self.rank else ""
        return f"{self.method}{ranks}/{self.precision}" + ("/recomposed" if self.run == "recomposed" else "")

    @property
    def kind(self) -> str:
        """The candidate's column in a table: method, level and precision (ranks differ per layer)."""
        return f"{self.method}/{self.precision}" if self.method == "none" else \
            f"{self.method}@{self.level}/{self.precision}"

    def layer_plan(self) -> LayerPlan:
        return LayerPlan(self.method, list(self.rank) if self.rank else None, self.precision, run=self.run)

    def matches(self, lp: LayerPlan) -> bool:
        """The same method, ranks and precision, however it runs (a recomposed run stores the chain's
        factors: its bytes and drop are the chain's)."""
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
        found = [cand for cand in self.layers[name] if cand.matches(lp)]
        if found:
            return next((cand for cand in found if cand.run == lp.run), found[0])
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

    def with_recomposed(self) -> SensitivityTable:
        """The table with each decomposed candidate also run recomposed: the same factors, so the same
        bytes and (as an estimate: the recomposed int8 layer rounds only its input) the same drop, and
        the layer's own MACs. What the allocator chooses from where latency is budgeted."""
        layers = {name: [v for c in cands for v in ((c,) if c.method == "none" else
                                                      (c, replace(c, run="recomposed", macs=cands[0].macs)))]
                  for name, cands in self.layers.items()}
        return replace(self, layers=layers)

    def to_json(self) -> str:
        raw = asdict(self)
        for cands in raw["layers"].values():  # tables written before `run` existed stay byte-identical
            for cand in cands:
                if cand["run"] == "chain":
                    del cand["run"]
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
