"""The allocator: within budget, exactly optimal (checked by brute force), fast, clear when infeasible."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from autorank.compression import Candidate, SensitivityTable, allocate, compress, profile
from autorank.errors import AutorankError


def brute_force(table: SensitivityTable, budget: int, max_macs: int | None = None) -> float | None:
    """The smallest predicted drop over every combination that fits, or None."""
    best = None
    for combo in itertools.product(*table.layers.values()):
        size = table.fixed_bytes + sum(c.size_bytes for c in combo)
        macs = table.fixed_macs + sum(c.macs for c in combo)
        if size <= budget and (max_macs is None or macs <= max_macs):
            drop = sum(max(c.drop, 0.0) for c in combo)
            best = drop if best is None else min(best, drop)
    return best


def assert_optimal(table: SensitivityTable, plan, budget: int, max_macs: int | None = None) -> None:
    """Within budget, the brute-force optimum, and no layer could take a larger candidate of no larger
    drop within the budget (the allocator spends a loose budget instead of shrinking for nothing)."""
    predicted = table.predict(plan)
    assert predicted.size_bytes <= budget and (max_macs is None or predicted.macs <= max_macs)
    assert predicted.drop == pytest.approx(brute_force(table, budget, max_macs), abs=1e-9)
    for name, lp in plan.layers.items():
        now = table.candidate(name, lp)
        for other in table.layers[name]:
            if max(other.drop, 0) <= max(now.drop, 0) and other.size_bytes > now.size_bytes:
                assert predicted.size_bytes - now.size_bytes + other.size_bytes > budget or (
                    max_macs is not None and predicted.macs - now.macs + other.macs > max_macs)


def synthetic_table(layers: int, per_layer: int, seed: int) -> SensitivityTable:
    """Seeded random candidates: sizes below each layer's fp32 size, drops with ties and noise below 0."""
    rng = random.Random(seed)
    table = {}
    for i in range(layers):
        full = rng.randrange(2_000, 40_000)
        cands = [Candidate("none", None, "fp32", None, full, 10 * full, full // 4, 0.9, 0.0)]
        for j in range(per_layer - 1):
            drop = rng.choice([0.0, -0.1, round(rng.uniform(0, 6), 1), round(rng.uniform(0, 6), 1)])
            size = rng.randrange(full // 16, full)
            cands.append(Candidate("tucker2", [j + 1, j + 1], "int8", 0.5, size, rng.randrange(full, 10 * full),
                                   size, 0.9 - drop / 100, drop))
        table[f"layer{i}.conv"] = cands
    model_bytes = 1_000 + sum(c[0].size_bytes for c in table.values())
    model_macs = 5_000 + sum(c[0].macs for c in table.values())
    return SensitivityTable(table, 0.9, model_bytes, model_macs, 1_000, 5_000)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_optimal_against_brute_force_on_random_tables(seed):
    table = synthetic_table(5, 5, seed)
    low = table.fixed_bytes + sum(min(c.size_bytes for c in cands) for cands in table.layers.values())
    for budget in (low, *random.Random(seed).sample(range(low, table.model_bytes), 12), table.model_bytes):
        for max_macs in (None, (table.model_macs + table.fixed_macs) // 2):
            if brute_force(table, budget, max_macs) is None:
                with pytest.raises(AutorankError, match="no plan"):
                    allocate(table, budget, max_macs=max_macs)
                continue
            assert_optimal(table, allocate(table, budget, max_macs=max_macs), budget, max_macs)


def test_allocation_on_the_digits_table_is_optimal_and_its_size_is_exact(digits_table, digits_cnn, digits):
    table = digits_table
    for ratio in (1.0, 1.5, 2, 3, 4, 6, 8, 10):
        budget = int(table.model_bytes / ratio)
        if brute_force(table, budget) is None:
            with pytest.raises(AutorankError, match="smallest size"):
                allocate(table, ratio=ratio)
            continue
        plan = allocate(table, ratio=ratio)
        assert list(plan.layers) == list(table.layers) and plan.activations == table.activations
        assert_optimal(table, plan, budget)
    plan = allocate(table, ratio=4)
    assert profile(compress(digits_cnn, plan, n_iter_max=20), digits.input_shape).size_bytes == \
        table.predict(plan).size_bytes
    assert allocate(table, ratio=1.0).layers["features.7"].precision == "fp32"  # no budget pressure: nothing lost


def test_infeasible_budget_names_the_smallest_reachable_size():
    table = synthetic_table(4, 3, 0)
    smallest = table.fixed_bytes + sum(min(c.size_bytes for c in cands) for cands in table.layers.values())
    assert allocate(table, smallest).layers  # exactly the smallest size is feasible
    with pytest.raises(AutorankError, match=f"smallest size the sensitivity table reaches: {smallest:,} bytes") as err:
        allocate(table, smallest - 1)
    assert "\n" not in str(err.value)
    with pytest.raises(AutorankError, match=r"x1000 smaller"):
        allocate(table, ratio=1000)
    with pytest.raises(AutorankError, match="fewest MACs"):
        allocate(table, table.model_bytes, max_macs=1)
    with pytest.raises(AutorankError, match="exactly one"):
        allocate(table, 10_000, ratio=2.0)
    with pytest.raises(AutorankError, match="exactly one"):
        allocate(table)


def test_a_resnet56_sized_table_gets_plans_within_budget_that_improve_with_budget():
    """55 layers x 13 candidates (ResNet-56's searchable convs + classifier): every ratio's plan fits
    its budget, and a larger budget never predicts a larger drop (speed is a benchmark's business)."""
    table = synthetic_table(55, 13, 1)
    drops = []
    for ratio in (6, 4, 2):
        predicted = table.predict(allocate(table, ratio=ratio))
        assert predicted.size_bytes <= table.model_bytes // ratio
        drops.append(predicted.drop)
    assert drops[0] >= drops[1] >= drops[2]


def _latency(plan, costs: dict[str, list[float]], fixed: float, table) -> float:
    """A plan's milliseconds under per-candidate costs, as the allocator sums them."""
    return fixed + sum(ms[[c.layer_plan() for c in table.layers[name]].index(plan.layers[name])]
                       for name, ms in costs.items())


def test_a_latency_budget_is_met_by_the_allocated_plan(digits_table):
    """Latency costs as a third budget row of the knapsack: costs made up so that the size budget alone
    picks the slowest plan (every layer's unconstrained choice costs 1 ms, any other 0.25 ms)."""
    unconstrained = allocate(digits_table, ratio=1.0)
    costs = {name: [1.0 if c.layer_plan() == unconstrained.layers[name] else 0.25 for c in cands]
             for name, cands in digits_table.layers.items()}
    fixed = 0.1
    loose, fastest = _latency(unconstrained, costs, fixed, digits_table), fixed + 0.25 * len(costs)
    limit = (loose + fastest) / 2
    plan = allocate(digits_table, ratio=1.0, max_latency_ms=limit, latency=(costs, fixed))
    assert _latency(plan, costs, fixed, digits_table) <= limit < loose
    assert digits_table.predict(plan).drop >= digits_table.predict(unconstrained).drop  # speed is paid for
    with pytest.raises(AutorankError, match=r"latency budget .* below the fastest plan the table reaches"):
        allocate(digits_table, ratio=1.0, max_latency_ms=fastest * 0.9, latency=(costs, fixed))
    with pytest.raises(AutorankError, match="needs the candidates' measured latencies"):
        allocate(digits_table, ratio=1.0, max_latency_ms=limit)


def test_measured_latency_costs_give_a_plan_within_the_budget(digits_table, digits_cnn, digits, tmp_path):
    """With the engine's measured ONNX Runtime costs, a budget just above the fastest reachable plan is met, and
    the table predicts the allocated plan's latency from the same costs."""
    from autorank.engine.latency import LatencyTable

    timings = LatencyTable(digits_cnn, digits.input_shape, tmp_path / "latency.json", model_key="digits_cnn",
                           threads=1, batch_size=8, seconds=0.005, runs=3)
    costs, fixed = timings.candidate_costs(digits_table)
    fastest = fixed + sum(min(ms) for ms in costs.values())
    limit = fastest * 1.001
    plan = allocate(digits_table, ratio=1.0, max_latency_ms=limit, latency=(costs, fixed))
    assert timings.predict(plan).b1_ms == pytest.approx(_latency(plan, costs, fixed, digits_table))
    assert timings.predict(plan).b1_ms <= limit * (1 + 1e-6)


def test_latency_costs_taken_once_serve_any_weighted_view_without_timing(digits_table, digits_cnn, digits, tmp_path):
    """A search takes its candidates' costs from the latency table once, in the driver; a trial's weighted
    view of the sensitivity table (fewer candidates, other drops) then gets the same costs the table would
    give it, with no timing (a Ray trial has no table, search.trial.with_latency)."""
    import dataclasses

    from autorank.engine.latency import LatencyTable
    from autorank.search.allocation import latency_costs

    timings = LatencyTable(digits_cnn, digits.input_shape, tmp_path / "latency.json", model_key="digits_cnn",
                           threads=1, batch_size=8, seconds=0.005, runs=3)
    costs = latency_costs(digits_table, timings)
    timed = timings.measured
    view = dataclasses.replace(digits_table, layers={
        name: [cands[0]] + [dataclasses.replace(c, drop=c.drop * 2) for c in cands[1:] if c.precision != "int4"]
        for name, cands in digits_table.layers.items()})
    assert costs.of(view) == timings.candidate_costs(view) and costs.of(digits_table) == timings.candidate_costs(
        digits_table)
    assert timings.measured == timed and timed > 0


def test_a_latency_budget_runs_layers_recomposed_where_their_chains_are_slower():
    """With each decomposed candidate also offered run recomposed (same bytes and drop, the layer's MACs),
    a latency budget that no plan of chains meets is met by running the chosen decompositions recomposed,
    at the size budget's optimal drop; without a latency budget nothing is recomposed."""
    table = synthetic_table(4, 4, 0)
    offered = table.with_recomposed()
    for name, cands in offered.layers.items():
        assert len(cands) == 1 + 2 * (len(table.layers[name]) - 1)
        for chain, one in zip(cands[1::2], cands[2::2], strict=True):
            assert one.run == "recomposed" and one.label == f"{chain.label}/recomposed"
            assert (one.size_bytes, one.drop, one.macs) == (chain.size_bytes, chain.drop, cands[0].macs)
    # made-up costs: the layer whole 1 ms, any chain 3 ms, any recomposed run 1 ms
    costs = {name: [1.0 if c.method == "none" or c.run == "recomposed" else 3.0 for c in cands]
             for name, cands in offered.layers.items()}
    smallest = table.fixed_bytes + sum(min(c.size_bytes for c in cands) for cands in table.layers.values())
    budget = (table.model_bytes + smallest) // 2
    plan = allocate(offered, budget, max_latency_ms=len(costs) * 1.0, latency=(costs, 0.0))
    assert table.predict(plan).drop == pytest.approx(table.predict(allocate(table, budget)).drop)
    assert table.predict(plan).size_bytes <= budget
    decomposed = {name: lp for name, lp in plan.layers.items() if lp.method != "none"}
    assert decomposed and all(lp.run == "recomposed" for lp in decomposed.values())
    assert all(offered.candidate(name, lp).run == "recomposed" for name, lp in decomposed.items())
    assert all(lp.run == "chain" for lp in allocate(offered, budget).layers.values())


def leveled_table(layers: int, per_layer: int, seed: int) -> SensitivityTable:
    """`synthetic_table` with every layer's j-th decomposed candidate at rank level j, int8 or int4 at
    random (so some kinds are shared, some not), plus each layer kept whole at int8."""
    table = synthetic_table(layers, per_layer, seed)
    rng = random.Random(seed)
    out = {}
    for name, cands in table.layers.items():
        full = cands[0]
        whole = Candidate("none", None, "int8", None, full.size_bytes // 4, full.macs, full.params, 0.9, 0.1)
        out[name] = [full, whole] + [replace(c, level=f"vbmf*{j}", precision=rng.choice(["int8", "int4"]))
                                     for j, c in enumerate(cands[1:], 1)]
    return replace(table, layers=out)


def brute_force_tied(table: SensitivityTable, budget: int, tied: list[list[str]]) -> float | None:
    """The smallest predicted drop over the combinations where each tied group's members share one kind
    (method, level, precision), a member lacking the kind kept whole at that precision."""
    best = None
    for combo in itertools.product(*table.layers.values()):
        chosen = dict(zip(table.layers, combo))
        if any(not _one_choice([chosen[n] for n in group], [table.layers[n] for n in group]) for group in tied):
            continue
        if table.fixed_bytes + sum(c.size_bytes for c in combo) <= budget:
            drop = sum(max(c.drop, 0.0) for c in combo)
            best = drop if best is None else min(best, drop)
    return best


def _one_choice(picks: list[Candidate], options: list[list[Candidate]]) -> bool:
    for kind in {c.kind for c in picks}:
        precision = kind.rsplit("/", 1)[-1]
        if all(c.kind == kind or (c.kind == f"none/{precision}" and all(o.kind != kind for o in opts))
               for c, opts in zip(picks, options, strict=True)):
            return True
    return False


@pytest.mark.parametrize("seed", range(3))
def test_tied_groups_take_one_choice_and_the_tied_plan_is_optimal_by_brute_force(seed):
    table = leveled_table(5, 4, seed)
    names = list(table.layers)
    # the last layer loses its level-1 candidates: tied to level 1, it stays whole at that precision
    table.layers[names[4]] = [c for c in table.layers[names[4]] if c.level != "vbmf*1"]
    tied = [[names[0], names[2]], [names[3], names[4]]]
    low = table.fixed_bytes + sum(min(c.size_bytes for c in cands) for cands in table.layers.values())
    for budget in sorted(random.Random(seed).sample(range(low, table.model_bytes), 10)):
        best = brute_force_tied(table, budget, tied)
        if best is None:
            with pytest.raises(AutorankError, match="below the smallest size"):
                allocate(table, budget, tied=tied)
            continue
        plan = allocate(table, budget, tied=tied)
        picks = {name: table.candidate(name, lp) for name, lp in plan.layers.items()}
        assert table.predict(plan).size_bytes <= budget
        assert table.predict(plan).drop == pytest.approx(best, abs=1e-9)
        for group in tied:
            assert _one_choice([picks[n] for n in group], [table.layers[n] for n in group])
        assert table.predict(plan).drop >= table.predict(allocate(table, budget)).drop - 1e-9  # ties cost


def test_tied_groups_must_be_distinct_table_layers():
    table = leveled_table(3, 3, 0)
    names = list(table.layers)
    with pytest.raises(AutorankError, match="not in the table: \\['conv9'\\]"):
        allocate(table, ratio=1.0, tied=[[names[0], "conv9"]])
    with pytest.raises(AutorankError, match="more than one tied group"):
        allocate(table, ratio=1.0, tied=[[names[0], names[1]], [names[1], names[2]]])
