"""Allocate mode's costs: fitted to finished trials they recover how table drops add up, they stay the
raw table until the trials can tell, and they change what the allocator picks."""

from __future__ import annotations

import itertools
import json

import pytest

from autorank.compression import Candidate, Plan, SensitivityTable
from autorank.search.allocation import (MIN_FIT_TRIALS, DropCosts, allocated_plan, fit_drop_costs, plan_features)
from autorank.search.space import parse_space

LAYERS = ("a.conv", "b.conv", "c.conv")


def table() -> SensitivityTable:
    """Three 1,000-byte layers: int8 and int4 whole, Tucker-2 at two ranks (one with a drop below 0, as
    one image's noise gives on a small subset)."""
    layers = {}
    for i, name in enumerate(LAYERS):
        layers[name] = [Candidate("none", None, "fp32", None, 1000, 100, 250, 0.9, 0.0),
                        Candidate("none", None, "int8", None, 260, 100, 250, 0.9, 0.2 * (i + 1)),
                        Candidate("none", None, "int4", None, 130, 100, 250, 0.9, 0.5 + i),
                        Candidate("tucker2", [2, 2], "int8", "vbmf*2", 60, 40, 50, 0.9, 1.0 + i),
                        Candidate("tucker2", [4, 4], "int8", "vbmf*4", 120, 60, 110, 0.9, -0.2)]
    return SensitivityTable(layers, 0.9, 3_100, 400, 100, 100)


def plan_json(choice: tuple[Candidate, ...]) -> dict:
    return {"layers": {name: {"method": c.method, "rank": c.rank, "precision": c.precision}
                       for name, c in zip(LAYERS, choice)}}


def test_fitted_costs_recover_how_the_table_drops_add_up():
    """Every plan's measured drop made from known costs: the fit finds them (the prior is one pseudo-trial
    per coefficient against 125 plans)."""
    tab, truth = table(), DropCosts(0.2, 0.6, 0.3)
    finished = []
    for choice in itertools.product(*tab.layers.values()):
        features = plan_features(tab, plan_json(choice)["layers"])
        finished.append((plan_json(choice), truth.predict(features)))
    fitted = fit_drop_costs(tab, finished)
    assert fitted.trials == 125
    assert (fitted.quantized, fitted.decomposed, fitted.per_decomposition) == pytest.approx((0.2, 0.6, 0.3), abs=0.01)
    # features: drops below 0 count as 0, and decomposed layers are counted
    choice = (tab.layers["a.conv"][2], tab.layers["b.conv"][4], tab.layers["c.conv"][3])
    assert plan_features(tab, plan_json(choice)["layers"]) == pytest.approx((0.5, 3.0, 2))
    assert plan_features(tab, {}) == (0.0, 0.0, 0)  # layers a plan leaves out stay fp32


def test_costs_stay_the_raw_table_until_enough_trials_and_skip_plans_off_the_table():
    tab = table()
    plans = [plan_json(c) for c in itertools.islice(itertools.product(*tab.layers.values()), 20)]
    assert fit_drop_costs(tab, [(p, 1.0) for p in plans[:MIN_FIT_TRIALS - 1]]) == DropCosts()
    off = json.loads(json.dumps(plans[0]))
    off["layers"]["a.conv"] = {"method": "tucker2", "rank": [3, 3], "precision": "int8"}  # a recipe's own ranks
    assert plan_features(tab, off["layers"]) is None
    assert fit_drop_costs(tab, [(off, 1.0)] * 10 + [(p, 1.0) for p in plans[:MIN_FIT_TRIALS - 1]]) == DropCosts()
    # only int-only plans so far: what decompositions cost stays the table's (nothing measured it)
    whole = [plan_json(c) for c in itertools.product(*[cands[:3] for cands in tab.layers.values()])]
    fitted = fit_drop_costs(tab, [(p, 0.1 * sum(plan_features(tab, p["layers"])[:2])) for p in whole])
    assert fitted.quantized == pytest.approx(0.1, abs=0.01)
    assert (fitted.decomposed, fitted.per_decomposition) == pytest.approx((1.0, 0.0))


def test_fitted_costs_change_the_plan():
    """At 4.4x the raw table takes the free Tucker-2 (drop < 0) on every layer; once every decomposition
    costs a point, the plan keeps layers whole where that is cheaper, and is the cheaper under those costs."""
    space = parse_space({"mode": "allocate", "methods": ["none", "tucker2"], "precisions": ["fp32", "int8", "int4"],
                         "allocate": {"ratio": [4.4, 4.4], "sharpness": [1, 1], "decomposed_weight": [1, 1]}})
    tab = table()
    groups = space.groups({name: "conv" for name in LAYERS})
    params = {"allow.tucker2": True, "lowest_precision": "int4"}
    raw, raw_said = allocated_plan(tab, space, groups, params)
    assert {lp.method for lp in raw.layers.values()} == {"tucker2"} and raw_said["predicted_drop"] == 0.0
    assert raw_said["cost_trials"] == 0.0 and raw_said["calibrated_drop"] == 0.0
    costs = DropCosts(1.0, 1.0, 1.0, trials=9)
    priced, said = allocated_plan(tab, space, groups, params, costs=costs)
    assert sum(lp.method != "none" for lp in priced.layers.values()) < 3
    assert said["calibrated_drop"] < costs.predict(plan_features(tab, json.loads(raw.to_json())["layers"]))
    assert said["predicted_bytes"] <= said["budget_bytes"] == 3_100 // 4.4
    decomposed = sum(lp.method != "none" for lp in priced.layers.values())
    assert said["calibrated_drop"] == pytest.approx(said["predicted_drop"] + decomposed) and said["cost_trials"] == 9.0
    assert isinstance(Plan.from_json(priced.to_json()), Plan)
