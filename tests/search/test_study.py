"""The driver's costs per trial: fitted from the study's finished table plans as a trial is asked,
kept on the trial, reused when an interrupted trial runs again, raw for warm starts."""

from __future__ import annotations

import optuna

from autorank.compression import Candidate, SensitivityTable
from autorank.search.allocation import DropCosts, fit_drop_costs
from autorank.search.space import parse_space
from autorank.search.study import COSTS_ATTR, drop_costs, recover_interrupted


def table() -> SensitivityTable:
    """Two layers; b.conv's Tucker-2 measures no drop (free in the raw table)."""
    def cands(decomposed_drop: float) -> list[Candidate]:
        return [Candidate("none", None, "fp32", None, 1000, 100, 250, 0.9, 0.0),
                Candidate("none", None, "int8", None, 260, 100, 250, 0.9, 1.0),
                Candidate("tucker2", [2, 2], "int8", "vbmf*2", 60, 40, 50, 0.9, decomposed_drop)]
    return SensitivityTable({"a.conv": cands(2.0), "b.conv": cands(0.0)}, 0.9, 2_100, 300, 100, 100)


def finished(study: optuna.Study, a: str, b: str, drop: float) -> None:
    """A trial that ran the plan (a.conv, b.conv) = (a, b), each 'int8' or 'tucker2', and lost `drop` points."""
    def layer(choice: str) -> dict:
        return {"method": "none", "rank": None, "precision": "int8"} if choice == "int8" else \
            {"method": "tucker2", "rank": [2, 2], "precision": "int8"}
    trial = study.ask()
    trial.set_user_attr("plan", {"layers": {"a.conv": layer(a), "b.conv": layer(b)}})
    trial.set_user_attr("metrics", {"drop_points": drop})
    study.tell(trial, [0.9, 1000.0])


def test_costs_are_fitted_when_asked_kept_on_the_trial_and_reused_by_its_retry(tmp_path):
    space = parse_space({"mode": "allocate", "methods": ["none", "tucker2"]})
    tab = table()
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, directions=space.directions)
    # measured = 0.25 per point of int8 drop + 0.5 per point of decomposition drop + 1 per decomposition
    for a, b, drop in [("int8", "int8", 0.5), ("int8", "tucker2", 1.25), ("tucker2", "int8", 2.25),
                       ("tucker2", "tucker2", 3.0)]:
        finished(study, a, b, drop)
    asked = study.ask()
    asked.suggest_float("ratio", 2.0, 20.0)
    costs = drop_costs(study, asked, space, tab)
    assert costs.trials == 4 and costs == fit_drop_costs(tab, [(t.user_attrs["plan"], t.user_attrs["metrics"]
                                                                  ["drop_points"]) for t in study.trials[:4]])
    assert costs.per_decomposition > 0.5 and costs.quantized < 0.5  # int8 costs less, each decomposition more
    assert study.trials[-1].user_attrs[COSTS_ATTR]["trials"] == 4
    finished(study, "tucker2", "tucker2", 9.0)  # a later trial finishes while the asked one runs ...
    recover_interrupted(study, storage, tmp_path)  # ... and the search is killed: the asked trial runs again
    retry = study.ask()
    assert retry.user_attrs["retry_of"] == asked.number
    assert drop_costs(study, retry, space, tab) == costs  # planned as it would have been, not refitted
    warm = study.ask()
    warm.set_user_attr("seed", "int8")
    assert drop_costs(study, warm, space, tab) == DropCosts() and COSTS_ATTR not in warm.user_attrs
    raw = parse_space({"mode": "allocate", "methods": ["none", "tucker2"], "allocate": {"calibrate": False}})
    assert drop_costs(study, study.ask(), raw, tab) == DropCosts()
