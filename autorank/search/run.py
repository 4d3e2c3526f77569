"""`run_search`: validate everything, measure the reference, run trials, keep the front, report.

Order matters for "nothing is lost": all inputs are checked (space, data, model, weights) and
the reference is measured before the output folder exists; each trial is told to the study before
its files are pruned or the callbacks hear of it (the CLI's MLflow tracker, `autorank.tracking`),
and the callbacks get every trial again on each resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autorank.data import Dataset, load_data
from autorank.engine.latency import LatencyTable, default_path
from autorank.errors import AutorankError
from autorank.models import create_model
from autorank.records import ORT_FIGURES, WEIGHTS_FILE, SearchCallback, SearchStart, TrialRecord, pareto_front
from autorank.search.allocation import latency_costs
from autorank.search.executors import EXECUTORS, custom_resources, parse_resources, ray_session, run_local, run_ray, tell
from autorank.search.final import run_final
from autorank.search.results import SEARCH_FILE, best_trial, load_search, read_info, storage_for
from autorank.search.screening import run_screened
from autorank.search.seeds import warm_starts
from autorank.search.space import SearchSpace, load_space, space_from_dict
from autorank.search.study import create_or_load_study, records, recover_interrupted
from autorank.search.table import HEATMAP_FILE, TABLE_FILE, search_table, write_heatmap
from autorank.search.trial import TrialContext, layer_table, reference_metrics


Callback = SearchCallback | Callable[[list[TrialRecord]], None]


@dataclass
class SearchResult:
    """A finished (or stopped) search: its trials, front and settings (search.json, with what the
    callbacks recorded there: where MLflow logged it)."""

    out_dir: Path
    study_name: str
    trials: list[TrialRecord]
    front: list[TrialRecord]
    reference: dict[str, float]
    info: dict[str, Any]
    elapsed_s: float

    @property
    def best(self) -> TrialRecord | None:
        """The most accurate feasible trial, or None when none is feasible."""
        try:
            return best_trial(load_search(self.out_dir))
        except AutorankError:
            return None


def run_search(
    space: SearchSpace | str | Path | None = None,
    model_name: str | None = None,
    weights: str | Path | None = None,
    data_spec: str | None = None,
    out_dir: str | Path = "autorank-search",
    *,
    trials: int | None = None,
    time_budget: float | None = None,
    executor: str = "local",
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    storage: str | None = None,
    study_name: str | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    ray_storage: str | None = None,
    trial_resources: dict[str, float] | None = None,
    max_concurrent: int = 1,
    progress: bool = True,
    data: Dataset | None = None,
) -> SearchResult:
    """Search compression plans for a pretrained model; see docs/SEARCH.md.

    `trials` / `time_budget` override the space's; with `resume`, settings left as None come from
    the folder's search.json and the study continues until `trials` trials have finished in total.
    `callbacks` hear of the search's start, files and every trial snapshot (`records.SearchCallback`, or a
    function called with each snapshot); `tracking.MlflowCallback()` logs the search to MLflow.
    Five steps: prepare (settings, checked), reference (model, data, the uncompressed figures, the
    folder), study (open it, tell the callbacks), execute (the table, the trials, the final fine-tune),
    finish (the last snapshot to the callbacks, the result).
    """
    run = _prepare(space, model_name, weights, data_spec, Path(out_dir), trials=trials, time_budget=time_budget,
                   executor=executor, resume=resume, callbacks=callbacks, storage=storage, study_name=study_name,
                   device=device, ray_address=ray_address, ray_storage=ray_storage,
                   trial_resources=trial_resources, max_concurrent=max_concurrent, progress=progress)
    _reference(run, data)
    current = _study(run)
    status = "FINISHED"
    try:
        _execute(run, current)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = _finish(run, status)
    return result


@dataclass
class _Run:
    """One call of run_search: the settings `_prepare` resolved, then what each later step adds."""

    out: Path
    space: SearchSpace
    model_name: str
    weights: str | Path | None
    data_spec: str
    trials: int | None
    time_budget: float | None
    executor: str
    resources: dict[str, float]
    max_concurrent: int
    ray_address: str | None
    ray_storage: str | None
    device: str
    progress: bool
    storage: str | None
    study_name: str | None
    hooks: list[SearchCallback]
    resume: bool
    info: dict[str, Any] | None          # search.json; read back on --resume, written by `_reference` otherwise
    started: float = field(default_factory=time.monotonic)
    finalized: bool = False              # the final fine-tune (if any) is done: no trial's figures change any more
    data: Dataset | None = None
    ctx: TrialContext | None = None
    study: optuna.Study | None = None
    rdb: optuna.storages.BaseStorage | None = None
    bar: _ProgressBar | None = None

    def say(self, message: str) -> None:
        _say(self.progress, message)

    @property
    def prunable(self) -> bool:
        """Whether trials' figures are settled, so weights off the front may go (`prune_weights`)."""
        return self.finalized or self.space.final.top == 0


def _prepare(space: SearchSpace | str | Path | None, model_name: str | None, weights: str | Path | None,
             data_spec: str | None, out: Path, *, trials: int | None, time_budget: float | None, executor: str,
             resume: bool, callbacks: Sequence[Callback], storage: str | None, study_name: str | None, device: str,
             ray_address: str | None, ray_storage: str | None, trial_resources: dict[str, float] | None,
             max_concurrent: int, progress: bool) -> _Run:
    """Resolve the settings (from search.json on --resume) and check them; nothing is written yet."""
    weights, data_spec = _absolute_paths(weights, data_spec)
    info: dict[str, Any] | None = None
    if resume:
        info = read_info(out)
        given = {"model": model_name, "weights": str(weights) if weights is not None else None, "data": data_spec}
        for key, value in given.items():
            if value is not None and value != info[key]:
                raise AutorankError(f"--resume: {key} {value!r} differs from the search's {info[key]!r}")
        model_name, weights, data_spec = info["model"], info["weights"], info["data"]
        stored = space_from_dict(info["space"])
        if space is not None:
            space = load_space(space) if not isinstance(space, SearchSpace) else space
            if space.to_dict() != stored.to_dict():
                raise AutorankError("--resume: the search space differs from the one the search started with")
        space = stored
        storage, study_name = info["storage"], info["study_name"]
    else:
        if (out / SEARCH_FILE).exists():
            raise AutorankError(f"{out} already holds a search: pass --resume to continue it, or choose another --out")
        if space is None or model_name is None or data_spec is None:
            raise AutorankError("a search needs a search space (--config), a model (--model) and data (--data)")
        space = load_space(space) if not isinstance(space, SearchSpace) else space
    trials = trials if trials is not None else (space.trials if time_budget is None else None)
    time_budget = time_budget if time_budget is not None else (space.time_budget if trials is None else None)
    if trials is None and time_budget is None and space.steps_budget is None:
        raise AutorankError("give a number of trials (--trials) and/or a time budget (--time-budget)")
    if space.screening is not None and executor != "local":
        raise AutorankError(f"search space {space.name}: screening runs with --executor local only")
    if trials is not None and trials < 1:
        raise AutorankError(f"--trials must be >= 1, got {trials}")
    if executor not in EXECUTORS:
        raise AutorankError(f"unknown executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if max_concurrent < 1:
        raise AutorankError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    custom = sorted(custom_resources(trial_resources or {}))
    if custom and (executor != "ray" or ray_address is None):
        # only nodes started with `ray start --resources` declare them: without a cluster no trial would ever start
        raise AutorankError(f"--trial-resources names custom Ray resources ({', '.join(custom)}) that only the nodes "
                            "of a Ray cluster declare: pass --executor ray --ray-address ADDRESS")
    return _Run(out=out, space=space, model_name=model_name, weights=weights, data_spec=data_spec, trials=trials,
                time_budget=time_budget, executor=executor, resources=trial_resources or parse_resources(None),
                max_concurrent=max_concurrent, ray_address=ray_address, ray_storage=ray_storage, device=device,
                progress=progress, storage=storage, study_name=study_name, resume=resume, info=info,
                hooks=[c if isinstance(c, SearchCallback) else _SnapshotCallback(c) for c in callbacks])


def _reference(run: _Run, data: Dataset | None) -> None:
    """Load the data and the model (the last user input checked), then for a new search measure the
    uncompressed reference and only then create the folder and its search.json."""
    space, out = run.space, run.out
    run.data = data if data is not None else load_data(run.data_spec, seed=space.seed)
    model = create_model(run.model_name, run.data, run.weights)
    layers = layer_table(model, space)
    groups = space.groups({name: info_.kind for name, info_ in layers.items()})
    run.ctx = ctx = TrialContext(space=space, groups=groups, layers=layers, model=model.cpu().eval(), reference={},
                                 out_dir=out.resolve(), device=run.device)
    lat = space.latency
    if set(space.objectives) & set(ORT_FIGURES) or space.constraints.max_latency_ms is not None:
        path = default_path(run.model_name, run.data.input_shape, lat.threads)
        ctx.latency = LatencyTable(ctx.model, run.data.input_shape, path,
                                   model_key=run.model_name, threads=lat.threads, batch_size=lat.batch_size)
    if run.info is not None:
        ctx.reference = run.info["reference"]
        return
    run.say(f"reference: fine-tuning the uncompressed {run.model_name} for {space.finetune.steps} steps")
    ctx.reference = reference_metrics(ctx, run.data)
    out.mkdir(parents=True, exist_ok=True)
    ctx.out_dir = out.resolve()
    run.study_name = run.study_name or space.name
    run.storage = run.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    run.info = {"version": 1, "search_id": uuid.uuid4().hex, "model": run.model_name,
                "weights": str(run.weights) if run.weights is not None else None, "data": run.data_spec,
                "study_name": run.study_name, "storage": run.storage, "space": space.to_dict(),
                "reference": ctx.reference,
                "layers": {n: {"kind": li.kind, "shape": list(li.shape), "evbmf": li.evbmf} for n, li in layers.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_info(out, run.info)


def _study(run: _Run) -> list[TrialRecord]:
    """Open the study (a new one gets the warm starts), recover interrupted trials, and start the
    callbacks on the current snapshot (what a resume replays); returns that snapshot."""
    space, ctx, info = run.space, run.ctx, run.info
    run.rdb = storage_for(run.storage)
    seed_limit = max(1, run.trials // 2) if run.trials is not None else None
    run.study = create_or_load_study(space, run.rdb, run.study_name, resume=run.resume, warm_starts=lambda: warm_starts(
        space, ctx.groups, ctx.layers, ctx.model, run.data.input_shape, limit=seed_limit))
    lost = recover_interrupted(run.study, run.rdb, ctx.out_dir)
    if lost:
        run.say(f"resume: trials {lost} were interrupted; their choices run again")
    start = SearchStart(out_dir=run.out, info=dict(info), name=space.name, space=space.to_dict(),
                        executor=run.executor, objectives=tuple(space.objectives), reference=dict(ctx.reference),
                        limits={"max_size": space.constraints.max_size, "max_drop": space.constraints.max_drop,
                                "max_latency_ms": space.constraints.max_latency_ms})
    for hook in run.hooks:
        info.update(hook.start(start))
    _write_info(run.out, info)
    current = records(run.study, ctx.out_dir)
    for hook in run.hooks:
        hook.trials(current)  # replays whatever a previous run could not hand on
    return current


def _execute(run: _Run, current: list[TrialRecord]) -> None:
    """The sensitivity table (once per search), the trials on the executor within the budgets, then the
    final fine-tune of the best front members; the callbacks get a snapshot after each trial."""
    space, ctx, study, data = run.space, run.ctx, run.study, run.data
    done_before = sum(1 for r in current if r.counted)
    run.bar = bar = _ProgressBar(run.progress, run.trials, done_before, run.time_budget)
    durations: list[float] = []

    def fine_tune_left() -> bool:
        """Room in search.steps_budget for one more trial fine-tune (screened-out trials spent none)."""
        if space.steps_budget is None:
            return True
        tuned = sum(1 for r in records(study, ctx.out_dir) if r.counted and r.state != "screened")
        return (tuned + 1) * space.finetune.steps <= space.steps_budget

    def budget_left(started_here: int) -> bool:
        if run.trials is not None and done_before + started_here >= run.trials:
            return False
        if not fine_tune_left():
            return False
        if run.time_budget is not None:
            elapsed = time.monotonic() - run.started
            expected = sum(durations) / len(durations) if durations else 0.0
            return elapsed + expected <= run.time_budget
        return True

    def refresh() -> list[TrialRecord]:
        snapshot = records(study, ctx.out_dir)
        if run.prunable:
            prune_weights(snapshot, space.objectives)
        for hook in run.hooks:
            hook.trials(snapshot)
        return snapshot

    def on_done(outcome: TrialRecord) -> None:
        durations.append(outcome.metrics.get("wall_s", 0.0))
        bar.update(refresh())

    remaining = (run.trials - done_before) if run.trials is not None else -1
    with contextlib.ExitStack() as session:
        table_due = space.sensitivity is not None and not (ctx.out_dir / TABLE_FILE).is_file()
        if run.executor == "ray" and (table_due or remaining != 0):
            session.enter_context(ray_session(run.ray_address, run.resources, run.max_concurrent))
        if space.sensitivity is not None:
            ctx.table = search_table(ctx, data, executor=run.executor, resources=run.resources, say=run.say)
            if ctx.latency is not None and space.mode == "allocate" and space.constraints.max_latency_ms is not None:
                ctx.latency_costs = latency_costs(ctx.table, ctx.latency)  # timed here, not in the trials
            heatmap = ctx.out_dir / HEATMAP_FILE
            if table_due or not heatmap.is_file():
                write_heatmap(ctx.table, ctx.out_dir)
            snapshot = records(study, ctx.out_dir)
            for hook in run.hooks:
                hook.files([ctx.out_dir / TABLE_FILE, heatmap])
                hook.trials(snapshot)
        if space.screening is not None:
            run_screened(study, ctx, data, budget_left, fine_tune_left,
                         lambda trial, outcome: (tell(study, trial, ctx, outcome), on_done(outcome)))
        elif run.executor == "local":
            run_local(study, ctx, data, budget_left, on_done)
        elif remaining != 0:
            run_ray(study, run.rdb, ctx, data, budget_left, on_done, num_samples=remaining, resources=run.resources,
                    max_concurrent=run.max_concurrent, ray_storage=run.ray_storage)
    if space.final.top > 0:
        run_final(study, ctx, data, lambda: records(study, ctx.out_dir), refresh, run.say)
    run.finalized = True


def _finish(run: _Run, status: str) -> SearchResult:
    """Prune the weights off the front and hand the last snapshot to the callbacks (also when the
    search failed or was interrupted: everything told to the study is kept and handed on)."""
    if run.bar is not None:
        run.bar.close()
    final = records(run.study, run.ctx.out_dir)
    if run.prunable:
        prune_weights(final, run.space.objectives)
    for hook in run.hooks:
        hook.finish(final, status)
    return SearchResult(out_dir=run.out, study_name=run.study_name, trials=final,
                        front=pareto_front(final, run.space.objectives), reference=run.ctx.reference, info=run.info,
                        elapsed_s=time.monotonic() - run.started)


def _absolute_paths(weights: str | Path | None, data_spec: str | None) -> tuple[str | Path | None, str | None]:
    """Local paths as absolute ones: search.json then serves export and --resume from any directory."""
    if weights is not None and Path(weights).expanduser().is_file():
        weights = str(Path(weights).expanduser().resolve())
    kind, sep, arg = (data_spec or "").partition(":")
    if sep and arg and kind in ("imagefolder", "cifar10") and Path(arg).expanduser().exists():
        data_spec = f"{kind}:{Path(arg).expanduser().resolve()}"
    return weights, data_spec


def prune_weights(trials: list[TrialRecord], objectives: tuple[str, ...] | list[str]) -> None:
    """Delete model.pt of finished trials off the unconstrained front.

    The unconstrained front contains the best trial for any later size/drop limits (`autorank
    best`, export), and a dominated trial never re-enters it while figures stay fixed, so these weights
    are never needed. A final fine-tune changes its members' figures, and one that ends lower can
    bring back a trial it used to dominate: so with `final:` the search prunes only once the final
    fine-tune is done (a trial's weights wait on disk until then).
    """
    keep = {t.number for t in pareto_front(trials, objectives, feasible_only=False)}
    for t in trials:
        if t.counted and t.number not in keep and t.directory is not None:
            (t.directory / WEIGHTS_FILE).unlink(missing_ok=True)


def _write_info(out: Path, info: dict[str, Any]) -> None:
    tmp = out / f".{SEARCH_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / SEARCH_FILE)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"autorank: {message}", file=sys.stderr)


class _SnapshotCallback(SearchCallback):
    """A plain function as a callback: called with every trial snapshot."""

    def __init__(self, function: Callable[[list[TrialRecord]], None]):
        self.function = function

    def trials(self, records: Sequence[TrialRecord]) -> None:
        self.function(list(records))


class _ProgressBar:
    """Trials done, best feasible so far, ETA (tqdm on stderr)."""

    def __init__(self, enabled: bool, trials: int | None, done: int, time_budget: float | None):
        self.bar = None
        self.time_budget, self.started = time_budget, time.monotonic()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trials, initial=done, desc="search", unit="trial", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, snapshot: list[TrialRecord]) -> None:
        if self.bar is None:
            return
        feasible = [t for t in snapshot if t.feasible]
        postfix = {"failed": sum(t.state == "failed" for t in snapshot)}
        if feasible:
            best = max(feasible, key=lambda t: (t.figures["accuracy"], -t.figures["size_bytes"]))
            postfix["best"] = f"{best.figures['accuracy'] * 100:.2f}% @ {best.figures['size_bytes'] / 1e3:.1f}KB (#{best.number})"
        if self.time_budget is not None:
            postfix["left"] = f"{max(0.0, self.time_budget - (time.monotonic() - self.started)) / 60:.1f}min"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["SearchResult", "prune_weights", "run_search"]
