"""The Optuna side of a search: the study, its sampler, warm starts, telling results, resuming.

Only the process that owns the study writes to its storage (the local loop, or Ray's driver
through OptunaSearch); trial workers return their trial's `TrialRecord` and never touch it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autorank.compression import SensitivityTable
from autorank.records import TrialRecord
from autorank.search.allocation import DropCosts, fit_drop_costs
from autorank.search.results import TRIALS_DIR, record_from_trial
from autorank.search.space import SearchSpace

COSTS_ATTR = "drop_costs"


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """nsga2 | tpe | gp | random, seeded; constraints reach them through `trial.set_constraint`.
    TPE and GP model the objectives from `population` trials on (warm starts included)."""
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=space.population, seed=space.seed)
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=space.seed, multivariate=True, n_startup_trials=space.population)
    if space.sampler == "gp":
        return optuna.samplers.GPSampler(seed=space.seed, n_startup_trials=space.population)
    return optuna.samplers.RandomSampler(seed=space.seed)


def create_or_load_study(space: SearchSpace, storage: optuna.storages.BaseStorage, name: str, *, resume: bool,
                         warm_starts: Callable[[], Sequence[tuple[str, dict[str, Any]]]]) -> optuna.Study:
    """Open the study; a new one gets the warm starts (`autorank.search.seeds`) enqueued first, each
    with its name in the user attr `seed`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, directions=space.directions,
                                sampler=make_sampler(space), load_if_exists=resume)
    if not study.trials:
        for seed, params in warm_starts():
            study.enqueue_trial(params, user_attrs={"seed": seed})
    return study


def recover_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, out_dir: Path) -> list[int]:
    """Trials left RUNNING by a killed search: mark them interrupted (not counted), re-enqueue their
    choices so the sampled point is not lost, and drop their half-written folders."""
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **{
                k: v for k, v in trial.user_attrs.items() if k in ("seed", COSTS_ATTR)}})
        shutil.rmtree(out_dir / TRIALS_DIR / str(trial.number), ignore_errors=True)
        lost.append(trial.number)
    return lost


def drop_costs(study: optuna.Study, trial: optuna.Trial, space: SearchSpace, table: SensitivityTable | None
               ) -> DropCosts:
    """The costs allocate mode plans `trial` with (autorank.search.allocation), fitted to the study's
    finished trials as it is asked and kept on it: a re-run of an interrupted trial plans as it would have.
    The raw table where the space does not calibrate, and for a warm-start recipe (it plans nothing)."""
    if space.mode != "allocate" or table is None or not space.allocate.calibrate or "seed" in trial.user_attrs:
        return DropCosts()
    if COSTS_ATTR in trial.user_attrs:
        return DropCosts(**trial.user_attrs[COSTS_ATTR])
    finished = [(t.user_attrs["plan"], t.user_attrs["metrics"]["drop_points"])
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "plan" in t.user_attrs and "drop_points" in t.user_attrs.get("metrics", {})]
    costs = fit_drop_costs(table, finished)
    trial.set_user_attr(COSTS_ATTR, asdict(costs))
    return costs


def annotate(trial: optuna.trial.BaseTrial, outcome: TrialRecord) -> None:
    """Store a trial's figures, plan and constraints on the Optuna trial before it is told."""
    trial.set_user_attr("metrics", outcome.metrics)
    trial.set_user_attr("summary", outcome.summary)
    if outcome.plan is not None:
        trial.set_user_attr("plan", outcome.plan)
    if outcome.reason is not None:
        trial.set_user_attr("reason", outcome.reason)
    for key, value in outcome.constraints.items():
        trial.set_constraint(key, value)


def objective_values(space: SearchSpace, outcome: TrialRecord) -> list[float] | None:
    return [float(outcome.metrics[name]) for name in space.objectives] if outcome.finished_ok else None


def records(study: optuna.Study, out_dir: Path) -> list[TrialRecord]:
    attrs = study.user_attrs
    return [record_from_trial(t, out_dir, attrs) for t in study.get_trials(deepcopy=False)]
