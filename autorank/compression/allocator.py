"""`allocate(table, budget) -> Plan`: one global size budget turned into per-layer choices.

Given a `SensitivityTable`, pick exactly one candidate per layer (keeping the layer fp32 is one of
them) so that the predicted drop — the sum of the chosen candidates' drops, each measured with only
that layer compressed — is smallest while the model's size (exact: the table's fixed bytes plus the
chosen candidates' bytes) stays within the budget, and optionally its MACs within a MAC budget and
its deployment latency within a latency budget (`max_latency_ms`, with each candidate's measured
ONNX Runtime time from the engine's latency table, `LatencyTable.candidate_costs`).

This is a multiple-choice knapsack, solved exactly as a 0/1 integer program with scipy's `milp`
(HiGHS, relative gap 0): one binary per (layer, candidate), one "exactly one" row per layer, one
budget row per resource. Candidates that cannot be in an optimal plan (another in the same layer
has a smaller drop and is no larger) are removed first.

A negative measured drop (the subset's noise: compressing one layer without fine-tuning does not
really help) counts as 0, as in `SensitivityTable.predict`; otherwise the allocator would chase noise
into the most aggressive candidates. Many candidates then tie at 0 (fp16 and often int8), so the
optimal plan is then grown: layer by layer, in table order and repeatedly, the largest candidate whose drop is no
larger than the chosen one's replaces it if the budget still holds. The predicted drop stays optimal
and no single layer could be made larger at no cost, so a loose budget does not become a model far
smaller than asked for on the strength of drops the subset cannot resolve. (Exactly the largest
plan at the optimal drop would be a second knapsack, a subset-sum that took HiGHS up to a second.)

`tied` groups of layers (a network's stages, say) take one choice together: the same method, rank
level and precision (`Candidate.kind`) on every member, each at its own ranks, like the research's
uniform recipes but per group. A member without that level (a rank that would not shrink it, a method
its rules forbid) stays whole at that precision, as a recipe leaves it. Each group is then one layer of
the knapsack whose candidates add up their members'. Why: summed single-layer drops cannot tell that
moderate ranks spread over a whole stage recover better in fine-tuning than a few low-rank layers;
tied, the spread plan is one choice a search can ask for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autorank.errors import AutorankError

from .plan import Plan
from .sensitivity import Candidate, SensitivityTable


def _useful(cands: list[Candidate], use_macs: bool, ms: dict[int, float] | None = None) -> list[Candidate]:
    """The layer's candidates that can be in an optimal plan: none with a strictly larger drop than
    another that is no larger (and needs no more MACs, no more time), and one of each exact repeat."""
    def key(c: Candidate) -> tuple[float, int, int, float]:
        return (max(c.drop, 0.0), c.size_bytes, c.macs if use_macs else 0, ms[id(c)] if ms is not None else 0.0)

    kept: list[Candidate] = []
    for c in sorted(cands, key=key):
        d, size, macs, t = key(c)
        if not any(k == (d, size, macs, t) or (k[0] < d and k[1] <= size and k[2] <= macs and k[3] <= t)
                   for k in map(key, kept)):
            kept.append(c)
    return kept


def _minimum(table: SensitivityTable, attr: str) -> int:
    fixed = table.fixed_bytes if attr == "size_bytes" else table.fixed_macs
    return fixed + sum(min(getattr(c, attr) for c in cands) for cands in table.layers.values())


Latency = tuple[dict[str, list[float]], float]  # layer -> ms of each table candidate; ms of everything else


def _tie(table: SensitivityTable, tied: Sequence[Sequence[str]], latency: Latency | None
         ) -> tuple[SensitivityTable, Latency | None, dict[int, list[tuple[str, Candidate]]]]:
    """The table with each tied group as one layer (named by its first member) whose candidates are the
    choices every member can take, summed; their members by id; the latencies likewise."""
    grouped = {name for group in tied for name in group}
    unknown = sorted(grouped - set(table.layers))
    if unknown or sum(map(len, tied)) != len(grouped):
        raise AutorankError(f"allocate: tied groups must name distinct table layers; not in the table: {unknown}"
                            if unknown else "allocate: a layer is in more than one tied group")
    order = {name: i for i, name in enumerate(table.layers)}
    groups = sorted([sorted(g, key=order.get) for g in tied if g] + [[n] for n in table.layers if n not in grouped],
                    key=lambda g: order[g[0]])
    ms = {id(c): t for n, cands in table.layers.items() for c, t in zip(cands, latency[0][n], strict=True)} \
        if latency is not None else {}
    layers: dict[str, list[Candidate]] = {}
    times: dict[str, list[float]] = {}
    members: dict[int, list[tuple[str, Candidate]]] = {}
    for group in groups:
        own = [{(c.kind, c.run): c for c in table.layers[name]} for name in group]
        kinds = {}  # (kind, run) -> the first member's candidate of that kind: its method, precision, level
        for choices in own:
            for key, c in choices.items():
                kinds.setdefault(key, c)
        layers[group[0]], times[group[0]] = [], []
        for key, like in kinds.items():
            picks = []
            for name, choices in zip(group, own, strict=True):
                pick = choices.get(key) or choices.get((f"none/{like.precision}", "chain"))
                if pick is None:
                    break
                picks.append((name, pick))
            else:
                tie = picks[0][1] if len(group) == 1 else replace(
                    like, rank=None, size_bytes=sum(c.size_bytes for _, c in picks),
                    macs=sum(c.macs for _, c in picks), params=sum(c.params for _, c in picks),
                    accuracy=math.nan, drop=sum(max(c.drop, 0.0) for _, c in picks))
                layers[group[0]].append(tie)
                times[group[0]].append(sum(ms.get(id(c), 0.0) for _, c in picks))
                members[id(tie)] = picks
    return replace(table, layers=layers), (times, latency[1]) if latency is not None else None, members


def smallest_size(table: SensitivityTable, tied: Sequence[Sequence[str]] = ()) -> int:
    """The smallest size in bytes any plan over `table` reaches (with `tied` groups taking one choice)."""
    return _minimum(_tie(table, tied, None)[0] if tied else table, "size_bytes")


def fastest_latency(table: SensitivityTable, latency: Latency, tied: Sequence[Sequence[str]] = ()) -> float:
    """The smallest latency in ms any plan over `table` reaches, under `latency` (as `allocate` takes it)."""
    times, fixed = _tie(table, tied, latency)[1] if tied else latency
    return fixed + sum(min(ms) for ms in times.values())


def allocate(table: SensitivityTable, budget: int | None = None, *, ratio: float | None = None,
             max_macs: int | None = None, max_latency_ms: float | None = None,
             latency: Latency | None = None, tied: Sequence[Sequence[str]] = ()) -> Plan:
    """The plan with the smallest predicted drop whose size is at most `budget` bytes (or the table's
    uncompressed size / `ratio`) and, with `max_macs`, whose MACs are at most that, and with
    `max_latency_ms` whose predicted latency is at most that. `latency`: (layer → milliseconds of
    each of its table candidates, in table order; the milliseconds of everything else), as measured
    by the engine (`LatencyTable.candidate_costs`). `tied`: groups of layers that take one choice
    together (module docstring). Every table layer gets a layer plan with integer ranks; the plan's
    activations are the table's.

    Raises AutorankError (one line, naming the smallest reachable size or MACs) when no combination
    of the table's candidates fits.
    """
    if (budget is None) == (ratio is None):
        raise AutorankError("allocate: give exactly one of a size budget in bytes or a ratio")
    if ratio is not None:
        if not ratio > 0:
            raise AutorankError(f"target ratio {ratio} must be > 0")
        budget = math.floor(table.model_bytes / ratio)
    target = f"{budget:,} bytes" + (f" (x{ratio:g} smaller)" if ratio is not None else "")
    if latency is not None and (set(latency[0]) != set(table.layers) or
                                any(len(latency[0][n]) != len(c) for n, c in table.layers.items())):
        raise AutorankError("allocate: the latencies do not match the sensitivity table's candidates")
    members: dict[int, list[tuple[str, Candidate]]] = {}
    whole = table
    if tied:
        table, latency, members = _tie(table, tied, latency)
    smallest = _minimum(table, "size_bytes")
    if budget < smallest:
        raise AutorankError(f"size budget {target} is below the smallest size the sensitivity table reaches: "
                            f"{smallest:,} bytes (x{table.model_bytes / smallest:.2f} smaller)")
    if max_macs is not None and max_macs < (fewest := _minimum(table, "macs")):
        raise AutorankError(f"MAC budget {max_macs:,} is below the fewest MACs the sensitivity table reaches: "
                            f"{fewest:,}")

    ms: dict[int, float] | None = None
    fixed_ms = 0.0
    if max_latency_ms is not None:
        if latency is None:
            raise AutorankError("allocate: a latency budget needs the candidates' measured latencies")
        costs, fixed_ms = latency
        ms = {id(c): t for n, cands in table.layers.items() for c, t in zip(cands, costs[n], strict=True)}
        fastest = fastest_latency(table, latency)
        if max_latency_ms < fastest:
            raise AutorankError(f"latency budget {max_latency_ms:g} ms is below the fastest plan the table "
                                f"reaches: {fastest:.3f} ms")
    names = list(table.layers)
    options = [_useful(table.layers[n], max_macs is not None, ms) for n in names]
    flat = [c for cands in options for c in cands]
    n = len(flat)
    owner = np.repeat(np.arange(len(names)), [len(c) for c in options])
    one_each = csr_array((np.ones(n), (owner, np.arange(n))), shape=(len(names), n))
    sizes = np.array([c.size_bytes for c in flat], dtype=float)
    rows = [LinearConstraint(one_each, 1, 1), LinearConstraint(sizes[None, :], -np.inf, budget - table.fixed_bytes)]
    if max_macs is not None:
        macs = np.array([c.macs for c in flat], dtype=float)
        rows.append(LinearConstraint(macs[None, :], -np.inf, max_macs - table.fixed_macs))
    if ms is not None:
        times = np.array([ms[id(c)] for c in flat])
        rows.append(LinearConstraint(times[None, :], -np.inf, max_latency_ms - fixed_ms))
    drops = np.array([max(c.drop, 0.0) for c in flat])
    result = milp(drops, constraints=rows, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        limits = ([f"{max_macs:,} MACs"] if max_macs is not None else []) + \
            ([f"{max_latency_ms:g} ms"] if max_latency_ms is not None else [])
        raise AutorankError(f"no plan of the sensitivity table meets the size budget {target} and "
                            f"{' and '.join(limits)}")
    chosen = {names[i]: flat[j] for j, i in enumerate(owner) if result.x[j] > 0.5}
    _grow(chosen, [table.layers[n] for n in names], names, budget - table.fixed_bytes,
          None if max_macs is None else max_macs - table.fixed_macs,
          None if ms is None else (ms, max_latency_ms - fixed_ms))
    picks = {name: c for unit, c in chosen.items() for name, c in members.get(id(c), [(unit, c)])}
    return Plan({name: picks[name].layer_plan() for name in whole.layers}, table.activations)


def _grow(chosen: dict[str, Candidate], options: list[list[Candidate]], names: list[str], room: int,
          mac_room: int | None, time_room: tuple[dict[int, float], float] | None = None) -> None:
    """Replace, layer by layer, each choice by the largest candidate of no larger drop that still fits;
    again until none changes (a larger candidate can need fewer MACs and make room for another)."""
    size = sum(c.size_bytes for c in chosen.values())
    macs = sum(c.macs for c in chosen.values())
    ms, ms_room = time_room if time_room is not None else ({}, math.inf)
    spent = sum(ms.get(id(c), 0.0) for c in chosen.values())
    changed = True
    while changed:  # the size grows with every change: this ends
        changed = False
        for name, cands in zip(names, options, strict=True):
            now = chosen[name]
            fits = [c for c in cands if c is now or max(c.drop, 0.0) <= max(now.drop, 0.0)
                    and size - now.size_bytes + c.size_bytes <= room
                    and (mac_room is None or macs - now.macs + c.macs <= mac_room)
                    and spent - ms.get(id(now), 0.0) + ms.get(id(c), 0.0) <= ms_room]
            best = max(fits, key=lambda c: c.size_bytes)
            if best.size_bytes > now.size_bytes:
                size += best.size_bytes - now.size_bytes
                macs += best.macs - now.macs
                spent += ms.get(id(best), 0.0) - ms.get(id(now), 0.0)
                chosen[name], changed = best, True
