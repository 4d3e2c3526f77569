"""`mode: allocate`: one trial's few sampled parameters -> a per-layer Plan from the sensitivity table.

The sample says how small (`ratio`, times below the uncompressed fp32 size), with what (`allow.<method>`
switches a decomposition on or off, `lowest_precision` allows that precision and every wider one;
keeping a layer fp32 is always allowed) and how to read the table (`sharpness` p and `decomposed_weight` w turn each candidate's measured drop d
into w^[decomposed] * max(d, 0)^p). The allocator then picks, per layer, the candidate that minimises
the summed weighted drops within the byte budget. Why the two weights: single-layer zero-shot drops
add up only roughly (the table over-predicts at moderate ratios and under-predicts where many layers
are decomposed, docs/COMPRESSION.md), p > 1 spreads damage thinly and p < 1 concentrates it, and a
fine-tune recovers decompositions (data-aware fit + distillation) far more than it recovers the
table's zero-shot figure suggests, which w < 1 credits. The search learns both.

The sampled ratio is kept even where the allowed families cannot reach it: the sample then plans with
every candidate of the table (`widened`). Capping it at the smallest allowed size instead let a sampler
that had learnt "no decomposition" (decomposed trials score lower at first) propose the same capped
int4 plan again and again: 7 of 21 sampled ResNet-20 trials trained the same 7.14x plan (docs/SEARCH.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from autorank.compression import Plan, SensitivityTable, allocate
from autorank.engine.latency import LatencyTable
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
                   params: Mapping[str, Any], everything: bool = False) -> SensitivityTable:
    """The table the allocator sees for `params`: only the allowed candidates (keep fp32 always;
    `everything`: every candidate), each drop replaced by its weighted value (module docstring)."""
    methods, precisions = _allowed(space, groups, params, everything)
    sharpness = params.get("sharpness", space.allocate.sharpness[0])
    weight = params.get("decomposed_weight", space.allocate.decomposed_weight[0])
    layers = {}
    for name, cands in table.layers.items():
        kept = [c for c in cands[1:] if c.precision in precisions and (c.method == "none" or c.method in methods)]
        layers[name] = [cands[0]] + [replace(c, drop=max(c.drop, 0.0) ** sharpness * (1.0 if c.method == "none"
                                                                                          else weight))
                                     for c in kept]
    return replace(table, layers=layers)


def smallest_bytes(table: SensitivityTable) -> int:
    """The smallest size any plan over `table` reaches."""
    return table.fixed_bytes + sum(min(c.size_bytes for c in cands) for cands in table.layers.values())


def allocated_plan(table: SensitivityTable, space: SearchSpace, groups: Sequence[Group],
                   params: Mapping[str, Any], latency: LatencyCosts | None = None) -> tuple[Plan, dict[str, float]]:
    """The trial's plan and what the table says of it: `budget_bytes` (the sampled target; raised to the
    smallest reachable size only when no candidate of the table goes that low), `widened` (1.0 when the
    allowed candidates could not reach the target and every candidate was allowed), `predicted_drop`
    (the table's own drops, unweighted) and `predicted_bytes` (exact). With the space's
    `max_latency_ms` and the search's measured `latency` costs, the allocator also keeps the plan's
    predicted ONNX Runtime latency within that limit (raised to the fastest reachable plan if lower), choosing
    per decomposed layer to run its chain or the layer recomposed (`LayerPlan.run`), whichever the budget needs."""
    seen = weighted_table(table, space, groups, params)
    target = math.floor(table.model_bytes / params.get("ratio", space.allocate.ratio[0]))
    widened = smallest_bytes(seen) > target
    if widened:
        seen = weighted_table(table, space, groups, params, everything=True)
    budget = max(target, smallest_bytes(seen))
    limit = space.constraints.max_latency_ms
    if latency is not None and limit is not None:
        seen = seen.with_recomposed()  # where a chain is slower than its layer, the layer may run recomposed
        costs, fixed = latency.of(seen)
        fastest = fixed + sum(min(ms) for ms in costs.values())
        plan = allocate(seen, budget, max_latency_ms=max(limit, fastest), latency=(costs, fixed))
    else:
        plan = allocate(seen, budget)  # the table's activations: the space's one
    predicted = table.predict(plan)
    return plan, {"budget_bytes": float(budget), "widened": float(widened), "predicted_drop": predicted.drop,
                  "predicted_bytes": float(predicted.size_bytes)}
