"""`mode: allocate`: one trial's few sampled parameters -> a per-layer Plan from the sensitivity table.

The sample says how small (`ratio`, times below the uncompressed fp32 size), with what (`allow.<method>`
switches a decomposition on or off, `lowest_precision` allows that precision and every wider one;
keeping a layer fp32 is always allowed), how to read the table (`sharpness` p and `decomposed_weight` w)
and, where the space allows both, whether each layer chooses alone or each stage as one (`granularity`).
The allocator then picks, per layer (or per stage), the candidate that minimises the summed costs within
the byte budget.

Why costs, not the table's drops: single-layer zero-shot drops add up only roughly after a trial's
fine-tune. On ResNet-20 (docs/BENCHMARKS.md) their sum over-predicted int-only plans (3.4 pt predicted,
0.5 measured) and under-predicted plans that decompose many convs (0.8-2.8 predicted, 3.0-3.3 measured;
a fifth of the decomposition candidates measure a drop <= 0 on 500 images, so the raw table takes them
for free). So the search fits `DropCosts` to its own finished trials: measured drop ~ a*Q + b*D + c*n,
Q and D the summed table drops of a plan's whole and decomposed layers, n its decomposed layers
(leave-one-out error 0.25 pt there, against 2.63 for the raw sum). A candidate then costs
a*max(d, 0)^p kept whole and w*(b*max(d, 0)^p + c) decomposed; before enough trials, a = b = 1 and c = 0
(the raw table). The sampled p and w perturb that reading: p > 1 spreads damage thinly, p < 1
concentrates it, w rescales what decompositions cost.

The sampled ratio is kept even where the allowed families cannot reach it: the sample then plans with
every candidate of the table (`widened`). Capping it at the smallest allowed size instead let a sampler
that had learnt "no decomposition" (decomposed trials score lower at first) propose the same capped
int4 plan again and again: 7 of 21 sampled ResNet-20 trials trained the same 7.14x plan (docs/SEARCH.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import nnls

from autorank.compression import Candidate, Plan, SensitivityTable, allocate, fastest_latency, smallest_size
from autorank.engine.latency import LatencyTable
from autorank.errors import AutorankError
from autorank.search.space import Group, SearchSpace


@dataclass(frozen=True)
class LatencyCosts:
    """Measured batch-1 ONNX Runtime milliseconds of every sensitivity-table candidate (layer -> candidate
    label -> ms) and of everything else: taken from the latency table once, in the driver, before any
    trial, so that a trial plans within `max_latency_ms` without the table (which would time a missing
    block on a Ray worker, contended by other trials, and write the driver's cache path on its disk)."""

    layers: dict[str, dict[str, float]]
    fixed: float

    def of(self, table: SensitivityTable) -> tuple[dict[str, list[float]], float]:
        """What `compression.allocate` budgets with, for `table` (the search's table or a weighted view of it)."""
        return {name: [self.layers[name][c.label] for c in cands] for name, cands in table.layers.items()}, self.fixed


def latency_costs(table: SensitivityTable, latency: LatencyTable) -> LatencyCosts:
    """Every candidate's measured cost, each decomposed one also run recomposed (`with_recomposed`),
    timing the blocks the latency table lacks, here in the driver."""
    table = table.with_recomposed()
    costs, fixed = latency.candidate_costs(table)
    return LatencyCosts({name: {c.label: ms for c, ms in zip(cands, costs[name], strict=True)}
                         for name, cands in table.layers.items()}, fixed)


MIN_FIT_TRIALS = 4  # finished trials before the costs leave the raw table (three coefficients, one to spare)


@dataclass(frozen=True)
class DropCosts:
    """What a plan's measured val drop after a trial's fine-tune costs in the table's terms (module
    docstring): `quantized` a per point of whole-layer table drop, `decomposed` b per point of
    decomposed-layer drop, `per_decomposition` c per decomposed layer; `trials` the fit saw (0: raw)."""

    quantized: float = 1.0
    decomposed: float = 1.0
    per_decomposition: float = 0.0
    trials: int = 0

    def of(self, candidate: Candidate, sharpness: float = 1.0) -> float:
        """The candidate's cost (its drop d read through `sharpness`)."""
        drop = max(candidate.drop, 0.0) ** sharpness
        if candidate.method == "none":
            return self.quantized * drop
        return self.decomposed * drop + self.per_decomposition

    def predict(self, features: tuple[float, float, int]) -> float:
        quantized, decomposed, count = features
        return self.quantized * quantized + self.decomposed * decomposed + self.per_decomposition * count


def plan_features(table: SensitivityTable, layers: Mapping[str, Mapping[str, Any]]) -> tuple[float, float, int] | None:
    """(Q, D, n) of a plan (its JSON `layers`): the summed table drops (>= 0) of its whole and of its
    decomposed layers, and how many it decomposes; None when a layer's choice is not a table candidate
    (a warm-start recipe's uniform ranks), since then the table says nothing of it."""
    plan = Plan.from_json(json.dumps({"layers": dict(layers)}))
    quantized = decomposed = 0.0
    count = 0
    for name in table.layers:
        try:
            match = table.candidate(name, plan.layers[name]) if name in plan.layers else table.reference(name)
        except AutorankError:
            return None
        if match.method == "none":
            quantized += max(match.drop, 0.0)
        else:
            decomposed += max(match.drop, 0.0)
            count += 1
    return quantized, decomposed, count


def fit_drop_costs(table: SensitivityTable, finished: Iterable[tuple[Mapping[str, Any], float]]) -> DropCosts:
    """`DropCosts` fitted to finished trials, each (plan JSON, measured drop in points): nonnegative
    least squares, pulled towards the raw table by one pseudo-observation per coefficient so that what
    the trials cannot tell apart yet (no decomposed plan so far, say) stays the table's own reading."""
    rows = [(f, drop) for plan, drop in finished if (f := plan_features(table, plan["layers"])) is not None]
    if len(rows) < MIN_FIT_TRIALS:
        return DropCosts()
    prior = DropCosts()
    x = np.array([f for f, _ in rows] + [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = np.array([drop for _, drop in rows] + [prior.quantized, prior.decomposed, prior.per_decomposition])
    (a, b, c), _ = nnls(x, y)
    return DropCosts(float(a), float(b), float(c), len(rows))


def table_choices(space: SearchSpace, groups: Sequence[Group]) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Per searched layer: (decompositions, precisions kept whole, precisions of decomposed layers) the
    table measures. Decomposed layers take the layer's integer precisions when it has any (a decomposed
    fp32 layer is practically never better than int8 kept whole), its own precisions otherwise."""
    choices = {}
    for g in groups:
        methods = [m for m in g.methods if m != "none"]
        integer = [p for p in g.precisions if p in ("int8", "int4")]
        for layer in g.layers:
            choices[layer] = (methods, list(g.precisions), integer or list(g.precisions))
    return choices


def _allowed(space: SearchSpace, groups: Sequence[Group], params: Mapping[str, Any],
             everything: bool = False) -> tuple[set[str], set[str]]:
    """(decompositions, precisions) a sample allows (`everything`: all of the space's); with one
    precision below fp32 there is nothing to sample."""
    reduced = space.reduced_precisions(groups)
    if everything:
        return set(space.families(groups)), {"fp32", *reduced}
    methods = {m for m in space.families(groups) if params[f"allow.{m}"]}
    lowest = params["lowest_precision"] if len(reduced) > 1 else None
    return methods, {"fp32", *reduced[:reduced.index(lowest) + 1 if lowest else len(reduced)]}


def weighted_table(table: SensitivityTable, space: SearchSpace, groups: Sequence[Group],
                   params: Mapping[str, Any], everything: bool = False, costs: DropCosts = DropCosts()
                   ) -> SensitivityTable:
    """The table the allocator sees for `params`: only the allowed candidates (keep fp32 always;
    `everything`: every candidate), each drop replaced by its cost (module docstring)."""
    methods, precisions = _allowed(space, groups, params, everything)
    sharpness = params.get("sharpness", space.allocate.sharpness[0])
    weight = params.get("decomposed_weight", space.allocate.decomposed_weight[0])
    layers = {}
    for name, cands in table.layers.items():
        kept = [c for c in cands[1:] if c.precision in precisions and (c.method == "none" or c.method in methods)]
        layers[name] = [cands[0]] + [replace(c, drop=costs.of(c, sharpness) * (1.0 if c.method == "none" else weight))
                                     for c in kept]
    return replace(table, layers=layers)


def stage_groups(table: SensitivityTable, space: SearchSpace) -> list[list[str]]:
    """The table's layers by stage (`SearchSpace.stage`), for the allocator's `tied` groups."""
    stages: dict[str, list[str]] = {}
    for name in table.layers:
        stages.setdefault(space.stage(name), []).append(name)
    return list(stages.values())


def allocated_plan(table: SensitivityTable, space: SearchSpace, groups: Sequence[Group],
                   params: Mapping[str, Any], latency: LatencyCosts | None = None, costs: DropCosts = DropCosts()
                   ) -> tuple[Plan, dict[str, float]]:
    """The trial's plan, allocated with `costs` (the search's fit to its finished trials) per layer or, with
    `granularity: stage`, one choice per stage (`stage_groups`), and what the table
    says of it: `budget_bytes` (the sampled target; raised to the smallest reachable size only when no
    candidate of the table goes that low), `widened` (1.0 when the allowed candidates could not reach the
    target and every candidate was allowed), `predicted_drop` (the table's own drops summed),
    `calibrated_drop` (what `costs` predict at p = w = 1), `cost_trials` (how many trials `costs` were
    fitted to) and `predicted_bytes` (exact). With the space's
    `max_latency_ms` and the search's measured `latency` costs, the allocator also keeps the plan's
    predicted ONNX Runtime latency within that limit (raised to the fastest reachable plan if lower), choosing
    per decomposed layer to run its chain or the layer recomposed (`LayerPlan.run`), whichever the budget needs."""
    seen = weighted_table(table, space, groups, params, costs=costs)
    tied = stage_groups(table, space) if params.get("granularity", space.allocate.granularity[0]) == "stage" else []
    target = math.floor(table.model_bytes / params.get("ratio", space.allocate.ratio[0]))
    smallest = smallest_size(seen, tied)
    widened = smallest > target
    if widened:
        seen = weighted_table(table, space, groups, params, everything=True, costs=costs)
        smallest = smallest_size(seen, tied)
    budget = max(target, smallest)
    limit = space.constraints.max_latency_ms
    if latency is not None and limit is not None:
        seen = seen.with_recomposed()  # where a chain is slower than its layer, the layer may run recomposed
        timings, fixed = latency.of(seen)
        fastest = fastest_latency(seen, (timings, fixed), tied)
        plan = allocate(seen, budget, max_latency_ms=max(limit, fastest), latency=(timings, fixed), tied=tied)
    else:
        plan = allocate(seen, budget, tied=tied)  # the table's activations: the space's one
    predicted = table.predict(plan)
    features = plan_features(table, json.loads(plan.to_json())["layers"])
    return plan, {"budget_bytes": float(budget), "widened": float(widened), "predicted_drop": predicted.drop,
                  "calibrated_drop": costs.predict(features), "cost_trials": float(costs.trials),
                  "predicted_bytes": float(predicted.size_bytes)}
