"""Warm starts: the trials a new study runs before any sampling.

They are the research's fixed recipes, so that the search starts from what a uniform plan achieves
and only has to beat it: int8 weights everywhere, then each decomposition of the space (CP, Tucker-2,
TT) on every conv at each of `search.seed_ratios` (parameter retention) with int8 weights; linear
layers stay whole at the recipe's precision (as `make_plan` does under a ratio), and rules still
apply (a layer that may not take the method stays whole; one that may not take the precision takes
its first). A rank that would not shrink its layer leaves it whole (`resolve_plan`), so no recipe
gives a layer more parameters than it has. In allocate mode one more warm start follows int8: the
allocator's first target is the EVBMF total (the model's parameters over its parameters with every
searched layer at its EVBMF ranks) with everything allowed — EVBMF is the prior, not a trial at raw
EVBMF ranks.

A recipe trial runs the recipe's plan (`recipe_plan`); its Optuna parameters are the point of the
space that describes it (layers mode: per group the recipe's method, the rank multiplier or ratio
nearest to the recipe's retention and its precision; allocate mode: the recipe's own size ratio, only
its method allowed, its precision as the lowest and, where sampled, stage granularity; the EVBMF target
plans per layer), so that the sampler learns from it like from any trial.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, profile, resolve_plan
from autorank.compression.ranks import method_params, scaled_ranks
from autorank.search.space import Group, SearchSpace

CONV_FAMILIES = ("cp", "tucker2", "tt")
EVBMF_TARGET = "evbmf-target"
_RECIPE = re.compile(r"(?:(cp|tucker2|tt)@([0-9.]+)/)?(fp32|fp16|int8|int4)")


@dataclass(frozen=True)
class Recipe:
    """A uniform plan: `method` at retention `ratio` on every conv (or none), weights at `precision`."""

    method: str
    ratio: float | None
    precision: str

    @property
    def name(self) -> str:
        return self.precision if self.method == "none" else f"{self.method}@{self.ratio:g}/{self.precision}"

    @classmethod
    def parse(cls, name: str | None) -> Recipe | None:
        """The recipe a warm start's name stands for (None for other names, e.g. the EVBMF target)."""
        match = _RECIPE.fullmatch(name or "")
        if match is None:
            return None
        method, ratio, precision = match.groups()
        return cls(method or "none", float(ratio) if ratio else None, precision)


def _precision(recipe: Recipe, group: Group) -> str:
    return recipe.precision if recipe.precision in group.precisions else group.precisions[0]


def _method(recipe: Recipe, group: Group) -> str:
    return recipe.method if group.kind == "conv" and recipe.method in group.methods else "none"


def recipe_plan(recipe: Recipe, groups: Sequence[Group], activations: str) -> Plan:
    """The recipe's plan for the searched layers (ranks as the retention ratio; resolve before use)."""
    layers = {}
    for g in groups:
        method = _method(recipe, g)
        for name in g.layers:
            layers[name] = LayerPlan(method, recipe.ratio if method != "none" else None, _precision(recipe, g))
    return Plan(layers, activations)


def recipes(space: SearchSpace, groups: Sequence[Group]) -> list[Recipe]:
    """int8 weights alone, then each conv decomposition of the space at each seed ratio, int8 weights;
    only recipes every group can express (a group without `none` cannot keep its layers whole)."""
    precisions = [p for g in groups for p in g.precisions]
    precision = next((p for p in ("int8", "int4", "fp16") if p in precisions), "fp32")
    found = [] if precision == "fp32" else [Recipe("none", None, precision)]
    methods = [m for m in CONV_FAMILIES if any(m in g.methods and g.kind == "conv" for g in groups)]
    found += [Recipe(m, ratio, precision) for ratio in space.seed_ratios for m in methods]
    return [r for r in found if all(_method(r, g) in g.methods for g in groups)]


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _nearest_multiplier(group: Group, method: str, ratio: float, layers: Mapping[str, Any]) -> float:
    """The group's EVBMF multiplier whose decomposed parameters come closest to `ratio` of its weights."""
    weights = sum(math.prod(layers[n].shape) for n in group.layers)
    grid = np.geomspace(group.rank[0], group.rank[1], 97) if group.rank[0] < group.rank[1] else [group.rank[0]]

    def params(multiplier: float) -> int:
        return sum(min(method_params(method, tuple(layers[n].shape), tuple(scaled_ranks(
            layers[n].evbmf[method], layers[n].full[method], multiplier))), math.prod(layers[n].shape))
            for n in group.layers)

    return float(min(grid, key=lambda m: abs(params(m) - ratio * weights)))


def _layers_params(space: SearchSpace, groups: Sequence[Group], layers: Mapping[str, Any],
                   recipe: Recipe) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for g in groups:
        method = _method(recipe, g)
        params[f"{g.key}.method"] = method
        if method != "none":
            params[f"{g.key}.rank"] = _clamp(recipe.ratio, g.rank) if space.rank_mode == "ratio" else \
                _nearest_multiplier(g, method, recipe.ratio, layers)
        params[f"{g.key}.precision"] = _precision(recipe, g)
    if len(space.activations) > 1 or space.activations != ("fp32",):
        params["activations"] = space.activations[0]
    return params


def _allocate_params(space: SearchSpace, groups: Sequence[Group], ratio: float, methods: set[str],
                     lowest: str, granularity: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in (("ratio", ratio), ("sharpness", 1.0), ("decomposed_weight", 1.0)):
        bounds = getattr(space.allocate, key)
        if bounds[0] < bounds[1]:
            params[key] = _clamp(value, bounds)
    for m in space.families(groups):
        params[f"allow.{m}"] = m in methods
    reduced = space.reduced_precisions(groups)
    if len(reduced) > 1:
        params["lowest_precision"] = lowest if lowest in reduced else reduced[-1]
    if len(space.allocate.granularity) > 1:
        params["granularity"] = granularity
    return params


def evbmf_ratio(model: nn.Module, layers: Mapping[str, Any], groups: Sequence[Group]) -> float:
    """The model's parameters over its parameters with every searched conv at its EVBMF ranks (the
    space's first decomposition of the layer; a rank that would not shrink a layer leaves it whole)."""
    total = sum(p.numel() for p in model.parameters())
    saved = 0
    for g in groups:
        method = next((m for m in g.methods if m != "none"), None)
        for name in g.layers if method is not None else ():
            shape, info = tuple(layers[name].shape), layers[name]
            saved += max(math.prod(shape) - method_params(method, shape, tuple(info.evbmf[method])), 0)
    return total / (total - saved)


def warm_starts(space: SearchSpace, groups: Sequence[Group], layers: Mapping[str, Any], model: nn.Module,
                input_shape: tuple[int, ...], limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, Optuna params) of each warm start, in order; at most `limit`."""
    if not space.seeds:
        return []
    found = recipes(space, groups)
    starts: list[tuple[str, dict[str, Any]]] = []
    model_bytes = profile(model, input_shape).size_bytes if space.mode == "allocate" else 0
    for recipe in found:
        if space.mode == "layers":
            params = _layers_params(space, groups, layers, recipe)
        else:
            plan = resolve_plan(model, recipe_plan(recipe, groups, space.activations[0]))
            size = profile(compress(model, plan, decompose=False), input_shape).size_bytes
            params = _allocate_params(space, groups, model_bytes / size, {recipe.method}, recipe.precision,
                                      "stage")  # one choice for every conv
        starts.append((recipe.name, params))
    if space.mode == "allocate":
        narrowest = (space.reduced_precisions(groups) or ["fp32"])[-1]
        everything = _allocate_params(space, groups, evbmf_ratio(model, layers, groups), set(space.families(groups)),
                                      narrowest, "layer")
        starts.insert(1 if found and found[0].method == "none" else 0, (EVBMF_TARGET, everything))
    return starts[:limit] if limit is not None else starts
