"""Where trials run: in this process (`local`, the default) or as Ray Tune trials (`ray`).

Both ask the same study for choices, run the same `compute_trial`, write its files with the same
`save_trial`, tell the study the same way (`annotate` + tell) and then call `on_done(outcome)` in
the driver, so the results, the tracking and the files on disk do not depend on the executor. With
Ray, OptunaSearch in the driver owns the study: workers never open the storage and write no file
of the search; a trial's record comes back in its Tune result and its files (the weights) through
an in-memory inbox actor on the driver's node, so a trial on another machine of a cluster loses
nothing and writes nothing on that machine's disk (docs/CLUSTER.md). Workers get the trial context
without the latency table: the driver adds each trial's `ort_*` figures (`trial.with_latency`), as
the local executor does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from autorank.data import Dataset
from autorank.errors import AutorankError
from autorank.records import TrialRecord
from autorank.search.allocation import DropCosts
from autorank.search.study import annotate, drop_costs, make_sampler, objective_values
from autorank.search.trial import TrialContext, TrialOutput, compute_trial, run_trial, save_trial, with_latency

EXECUTORS = ("local", "ray")
OnDone = Callable[[TrialRecord], None]
BudgetLeft = Callable[[int], bool]   # (trials started by this executor) -> may another start?


def tell(study: optuna.Study, trial: optuna.Trial, ctx: TrialContext, outcome: TrialRecord) -> None:
    """Record a finished trial in the study: figures and constraints first, then its state."""
    annotate(trial, outcome)
    values = objective_values(ctx.space, outcome)
    if outcome.state == "screened":
        study.tell(trial, state=TrialState.PRUNED)
    elif values is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, values)


def run_local(study: optuna.Study, ctx: TrialContext, data: Dataset, budget_left: BudgetLeft, on_done: OnDone) -> None:
    """Trials one after another in this process (no start-up cost)."""
    started = 0
    while budget_left(started):
        trial = study.ask()
        started += 1
        params = ctx.space.suggest(trial, ctx.groups)
        costs = drop_costs(study, trial, ctx.space, ctx.table)
        outcome = run_trial(ctx, data, params, trial.number, seed=trial.user_attrs.get("seed"), costs=costs)
        tell(study, trial, ctx, outcome)
        on_done(outcome)


def parse_resources(text: str | None) -> dict[str, float]:
    """'cpu=2,gpu=0.5' -> {'cpu': 2.0, 'gpu': 0.5}; other names are custom Ray resources a node
    declares (`ray start --resources`), e.g. 'cpu=1,trialnode=1'. Default: all CPUs, one GPU if there is one."""
    if not text:
        import torch

        return {"cpu": float(os.cpu_count() or 1), "gpu": 1.0 if torch.cuda.is_available() else 0.0}
    resources: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", key) or key in ("CPU", "GPU", "memory") or not amount >= 0 \
                or (key == "cpu" and amount <= 0):
            raise AutorankError(f"bad --trial-resources {text!r}: expected e.g. cpu=2,gpu=0.5 "
                                "(other names: custom Ray resources, e.g. cpu=1,trialnode=1)")
        resources[key] = amount
    resources.setdefault("cpu", 1.0)
    resources.setdefault("gpu", 0.0)
    return resources


def custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """The custom Ray resources among a trial's (what `.options(resources=...)` takes)."""
    return {k: v for k, v in resources.items() if k not in ("cpu", "gpu") and v > 0}


def trial_device(requested: str, gpu_ids: list) -> str:
    """The device of a trial in a Ray worker: `auto` means the GPU Ray assigned (it sets
    CUDA_VISIBLE_DEVICES, so that GPU is cuda:0), or the CPU when Ray assigned none (never a GPU
    another trial holds)."""
    if requested != "auto":
        return requested
    return "cuda" if gpu_ids else "cpu"


class _Inbox:
    """Finished trials' files (trial number -> {name: bytes}), held in memory until the driver takes them.

    It lives on the driver's node and dies with the driver: files are only ever written by the driver,
    and a trial whose files the driver never took was never told to the study, so `--resume` reruns it."""

    def __init__(self) -> None:
        self.files: dict[int, dict[str, bytes]] = {}

    def put(self, number: int, files: dict[str, bytes]) -> None:
        self.files[number] = files

    def take(self, number: int) -> dict[str, bytes] | None:
        return self.files.pop(number, None)


def _ray_trial(config: dict[str, Any], ctx: TrialContext, data: Dataset, inbox: Any) -> None:
    """The Ray Tune trainable: one trial in a worker; its files go to the driver's inbox, then its
    flat metrics plus its record (JSON) are reported. Nothing is written on the worker's disk."""
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    params = {k: v for k, v in config.items() if k not in ("trial_number", "seed", "costs")}
    number = int(config["trial_number"])
    worker_ctx = replace(ctx, device=trial_device(ctx.device, ray.get_gpu_ids()))
    output = compute_trial(worker_ctx, data, params, number, seed=config.get("seed"),
                           costs=DropCosts(**json.loads(config["costs"])))
    ray.get(inbox.put.remote(number, output.files))  # delivered before the result says the trial finished
    report = {name: float(output.record.metrics.get(name, math.nan)) for name in ctx.space.objectives}
    tune.report({**report, "outcome": output.record.to_json()})


def _finish_ray_trial(searcher, ctx: TrialContext, inbox: Any, outcome_json: str | None, ot_trial: optuna.Trial,
                      failed: bool, on_done: OnDone) -> None:
    """In the driver: add the trial's latency figures, write its files from the inbox, tell the study,
    hand the trial on."""
    import ray

    files = ray.get(inbox.take.remote(ot_trial.number))
    if outcome_json is not None and not failed and files is not None:
        output = with_latency(ctx, TrialOutput(TrialRecord.from_json(outcome_json), files))
        outcome = save_trial(ctx.out_dir, output)
    else:
        outcome = TrialRecord(number=ot_trial.number, state="failed", params=dict(ot_trial.params),
                              reason="the Ray worker running this trial failed (see the Ray logs)")
    tell(searcher._ot_study, ot_trial, ctx, outcome)
    on_done(outcome)


_STUDY_SEARCH = None


def _study_search_class():
    """OptunaSearch that stops at the budget and tells outcomes (constraints, reasons) itself.

    Built on first use (importing Ray is slow); its driver-side hooks are dropped when Tune pickles
    the searcher into its experiment state, since the study, not Tune, is what a resume reads.
    """
    global _STUDY_SEARCH
    if _STUDY_SEARCH is not None:
        return _STUDY_SEARCH
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        def __init__(self, budget_left: BudgetLeft, finish: Callable, **kwargs: Any):
            self._budget_left, self._finish, self._started = budget_left, finish, 0
            super().__init__(**kwargs)

        def __getstate__(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if k not in ("_budget_left", "_finish", "_ot_study",
                                                                          "_storage", "_space", "_sampler",
                                                                          "_ot_trials")}

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:  # the study holds the real state
                pickle.dump({"completed": sorted(self._completed_trials)}, f)

        def restore(self, checkpoint_path: str) -> None:
            """Nothing to restore: `--resume` reopens the study."""

        def suggest(self, trial_id: str):
            if not self._budget_left(self._started):
                return Searcher.FINISHED
            self._started += 1
            return super().suggest(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            outcome = (result or {}).get("outcome")
            if outcome is None and not error:
                return  # stopped before it finished (Ctrl-C): left running, so --resume reruns its choices
            self._finish(outcome, self._ot_trials[trial_id], error)

    _STUDY_SEARCH = StudySearch
    return StudySearch


@contextlib.contextmanager
def ray_session(address: str | None, resources: dict[str, float], max_concurrent: int) -> Iterator[None]:
    """Ray for the search's table and trials: joins `address`, or starts a local Ray with room for
    `max_concurrent` tasks of `resources` (at least every CPU) and shuts it down afterwards."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import logging

    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address is None:
        kwargs["num_cpus"] = max(int(math.ceil(resources["cpu"])) * max_concurrent, os.cpu_count() or 1)
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        # Free unreachable Ray object refs while Ray is up: the second Ray search in one process (table tasks,
        # then Tune) died with "core worker has already been shutdown" without this collection.
        gc.collect()
        ray.shutdown()


def run_ray(study: optuna.Study, storage: optuna.storages.BaseStorage, ctx: TrialContext, data: Dataset, budget_left: BudgetLeft, on_done: OnDone, *,
            num_samples: int, resources: dict[str, float], max_concurrent: int, ray_storage: str | None = None) -> None:
    """Trials as Ray Tune trials driven by OptunaSearch on this (the driver's) study (inside `ray_session`).

    `ray_storage`: Tune's storage (a path or URI every node reaches); default OUT/ray, on the driver's disk."""
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def define_by_run(trial) -> dict[str, Any]:
        ctx.space.suggest(trial, ctx.groups)  # Ray captures the suggested values as the config
        costs = drop_costs(trial.study, trial, ctx.space, ctx.table)  # fitted here, in the driver
        return {"trial_number": trial.number, "seed": trial.user_attrs.get("seed"), "costs": json.dumps(asdict(costs))}

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    inbox = ray.remote(_Inbox).options(num_cpus=0, scheduling_strategy=here).remote()
    searcher = _study_search_class()(
        budget_left, lambda outcome_json, ot_trial, failed: _finish_ray_trial(
            searcher, ctx, inbox, outcome_json, ot_trial, failed, on_done),
        space=define_by_run,
        metric=list(ctx.space.objectives),
        mode=["max" if d == "maximize" else "min" for d in ctx.space.directions],
        sampler=make_sampler(ctx.space), study_name=study.study_name, storage=storage)
    worker_ctx = replace(ctx, latency=None)  # timings are the driver's (`_finish_ray_trial`)
    trainable = tune.with_resources(tune.with_parameters(_ray_trial, ctx=worker_ctx, data=data, inbox=inbox),
                                    {k: v for k, v in resources.items() if v > 0})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                    num_samples=num_samples, reuse_actors=False),
        run_config=tune.RunConfig(storage_path=ray_storage or str((ctx.out_dir / "ray").resolve()), name="tune",
                                  verbose=0, log_to_file=False),
    )
    tuner.fit()
