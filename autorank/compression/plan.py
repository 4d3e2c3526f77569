"""Compression plans: per layer a decomposition method, its ranks and the weight precision."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from autorank.errors import AutorankError

from .decompose import CP_STABILIZE
from .layers import find_layers
from .methods import DECOMPOSITIONS
from .quantize import PRECISIONS

# "none" keeps a layer whole; the others are the registry's, by the layer type they decompose
METHODS = ("none", *DECOMPOSITIONS)
CONV_METHODS = ("none", *(name for name, m in DECOMPOSITIONS.items() if m.layer is nn.Conv2d))
LINEAR_METHODS = ("none", *(name for name, m in DECOMPOSITIONS.items() if m.layer is nn.Linear))
ACTIVATIONS = ("fp32", "int8")
# how a decomposed layer runs in the exported file: its chain of small ops, or one op of the layer's own
# geometry whose weight ONNX Runtime composes from the stored factors when the session loads
RUNS = ("chain", "recomposed")

RankSpec = int | float | str | list[int] | None


@dataclass
class LayerPlan:
    """What to do with one layer.

    rank: ints (one per rank position, or one int for all), a parameter-retention ratio in (0, 1],
    "vbmf" (EVBMF ranks) or "vbmf:W" (EVBMF with MUSCO weakening W in [0, 1]); None means "vbmf".
    stabilize: CP only — "epc" (balance + EPC correction, default), "balance", or "none".
    run: decomposed layers only — "chain" (default) runs the chain; "recomposed" stores the same
    factors but runs one conv/linear of the layer's geometry (its kernel composed from the factors
    when ONNX Runtime loads the file), for layers whose chain is slower than the layer; with int8
    activations the chain then quantizes only its input, as that one op does.
    """

    method: str = "none"
    rank: RankSpec = None
    precision: str = "fp32"
    stabilize: str = "epc"
    run: str = "chain"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AutorankError(f"method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise AutorankError(f"precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.stabilize not in CP_STABILIZE:
            raise AutorankError(f"stabilize {self.stabilize!r}: choose from {', '.join(CP_STABILIZE)}")
        if self.run not in RUNS:
            raise AutorankError(f"run {self.run!r}: choose from {', '.join(RUNS)}")
        if self.run == "recomposed" and self.method == "none":
            raise AutorankError("run 'recomposed' needs a decomposition method: a whole layer runs as itself")
        if isinstance(self.rank, tuple):
            self.rank = list(self.rank)


def _layer_json(lp: LayerPlan) -> dict:
    """A layer plan's JSON object; the default `run` is left out, so plans written before it existed
    (and the hashes and caches keyed by their JSON) stay byte-identical."""
    raw = asdict(lp)
    if raw["run"] == "chain":
        del raw["run"]
    return raw


@dataclass
class Plan:
    """A per-layer plan (keys are module names) plus the activation precision of quantized layers."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    activations: str = "fp32"  # fp32 | int8: fake-quant the inputs of every int8/int4 layer
    # why `resolve_plan` left a layer undecomposed, for the user; not part of the plan's JSON
    notes: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise AutorankError(f"activations {self.activations!r}: choose from {', '.join(ACTIVATIONS)}")

    def to_json(self) -> str:
        return json.dumps({"layers": {n: _layer_json(lp) for n, lp in self.layers.items()},
                           "activations": self.activations}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AutorankError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), dict):
            raise AutorankError('plan JSON must be an object with a "layers" object')
        unknown = set(raw) - {"layers", "activations"}
        if unknown:
            raise AutorankError(f"plan JSON has unknown keys: {', '.join(sorted(unknown))}")
        allowed = {f.name for f in fields(LayerPlan)}
        layers = {}
        for name, spec in raw["layers"].items():
            if not isinstance(spec, dict) or set(spec) - allowed:
                raise AutorankError(f"plan layer {name!r}: expected an object with keys {sorted(allowed)}")
            layers[name] = LayerPlan(**spec)
        return cls(layers, raw.get("activations", "fp32"))


def make_plan(model: nn.Module, method: str, rank: RankSpec = "vbmf", precision: str = "fp32", *,
              activations: str = "fp32", include: list[str] | None = None, exclude: list[str] | None = None,
              skip_first: bool = True) -> Plan:
    """The same recipe for every discovered layer: convs get `method`, linear layers SVD
    (`method="none"` quantizes only).

    The classifier (the model's last Linear layer) is decomposed only at EVBMF ranks, which judge
    whether its spectrum is low-rank: a ratio or an integer would cut the logits to a few directions
    (ResNet-20, CP at ratio 0.3 gave the 64->10 classifier rank 3 and cost 17 points before any
    training); a plan that names its ranks still decomposes it."""
    if method not in CONV_METHODS:
        raise AutorankError(f"method {method!r}: choose from {', '.join(CONV_METHODS)}")
    evbmf = rank is None or (isinstance(rank, str) and rank.startswith("vbmf"))
    classifier = None if evbmf else next((n for n, m in reversed(list(model.named_modules()))
                                          if isinstance(m, nn.Linear)), None)
    layers = {}
    for name, layer in find_layers(model, include, exclude, skip_first).items():
        layer_method = method if isinstance(layer, nn.Conv2d) or method == "none" else "svd"
        layer_method = "none" if name == classifier else layer_method
        layers[name] = LayerPlan(layer_method, rank if layer_method != "none" else None, precision)
    return Plan(layers, activations)
