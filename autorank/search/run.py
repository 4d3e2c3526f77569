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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorank.data import Dataset, load_data
from autorank.errors import AutorankError
from autorank.models import create_model
from autorank.search.executors import EXECUTORS, parse_resources, ray_session, run_local, run_ray, tell
from autorank.search.final import run_final
from autorank.records import WEIGHTS_FILE, SearchCallback, SearchStart, TrialRecord, pareto_front
from autorank.search.results import SEARCH_FILE, best_trial, load_search, read_info, storage_for
from autorank.search.screening import run_screened
from autorank.search.seeds import warm_starts
from autorank.search.space import SearchSpace, load_space, space_from_dict
from autorank.search.study import TrialOutcome, create_or_load_study, records, recover_interrupted
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
    """
    started = time.monotonic()
    out = Path(out_dir)
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
    resources = trial_resources or parse_resources(None)

    # Everything the user can get wrong is checked before the folder exists.
    data = data if data is not None else load_data(data_spec, seed=space.seed)
    model = create_model(model_name, data, weights)
    layers = layer_table(model, space)
    groups = space.groups({name: info_.kind for name, info_ in layers.items()})
    ctx = TrialContext(space=space, groups=groups, layers=layers, model=model.cpu().eval(), reference={},
                       out_dir=out.resolve(), device=device)
    if info is None:
        _say(progress, f"reference: fine-tuning the uncompressed {model_name} for {space.finetune.steps} steps")
        ctx.reference = reference_metrics(ctx, data)
        out.mkdir(parents=True, exist_ok=True)
        ctx.out_dir = out.resolve()
        study_name = study_name or space.name
        storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        info = {"version": 1, "search_id": uuid.uuid4().hex, "model": model_name,
                "weights": str(weights) if weights is not None else None, "data": data_spec,
                "study_name": study_name, "storage": storage, "space": space.to_dict(), "reference": ctx.reference,
                "layers": {n: {"kind": li.kind, "shape": list(li.shape), "evbmf": li.evbmf} for n, li in layers.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_info(out, info)
    else:
        ctx.reference = info["reference"]

    rdb = storage_for(storage)
    seed_limit = max(1, trials // 2) if trials is not None else None
    study = create_or_load_study(space, rdb, study_name, resume=resume, warm_starts=lambda: warm_starts(
        space, groups, layers, ctx.model, data.input_shape, limit=seed_limit))
    lost = recover_interrupted(study, rdb, ctx.out_dir)
    if lost:
        _say(progress, f"resume: trials {lost} were interrupted; their choices run again")

    hooks = [c if isinstance(c, SearchCallback) else _SnapshotCallback(c) for c in callbacks]
    start = SearchStart(out_dir=out, info=dict(info), name=space.name, space=space.to_dict(), executor=executor,
                        objectives=tuple(space.objectives), reference=dict(ctx.reference),
                        limits={"max_size": space.constraints.max_size, "max_drop": space.constraints.max_drop})
    for hook in hooks:
        info.update(hook.start(start))
    _write_info(out, info)
    current = records(study, ctx.out_dir)
    for hook in hooks:
        hook.trials(current)  # replays whatever a previous run could not hand on

    done_before = sum(1 for r in current if r.counted)
    bar = _ProgressBar(progress, trials, done_before, time_budget)
    durations: list[float] = []

    def fine_tune_left() -> bool:
        """Room in search.steps_budget for one more trial fine-tune (screened-out trials spent none)."""
        if space.steps_budget is None:
            return True
        tuned = sum(1 for r in records(study, ctx.out_dir) if r.counted and r.state != "screened")
        return (tuned + 1) * space.finetune.steps <= space.steps_budget

    def budget_left(started_here: int) -> bool:
        if trials is not None and done_before + started_here >= trials:
            return False
        if not fine_tune_left():
            return False
        if time_budget is not None:
            elapsed = time.monotonic() - started
            expected = sum(durations) / len(durations) if durations else 0.0
            return elapsed + expected <= time_budget
        return True

    def refresh() -> list[TrialRecord]:
        snapshot = records(study, ctx.out_dir)
        prune_weights(snapshot, space.objectives)
        for hook in hooks:
            hook.trials(snapshot)
        return snapshot

    def on_done(outcome: TrialOutcome) -> None:
        durations.append(outcome.metrics.get("wall_s", 0.0))
        bar.update(refresh(), outcome)

    status = "FINISHED"
    remaining = (trials - done_before) if trials is not None else -1
    try:
        with contextlib.ExitStack() as session:
            table_due = space.sensitivity is not None and not (ctx.out_dir / TABLE_FILE).is_file()
            if executor == "ray" and (table_due or remaining != 0):
                session.enter_context(ray_session(ray_address, resources, max_concurrent))
            if space.sensitivity is not None:
                ctx.table = search_table(ctx, data, executor=executor, resources=resources,
                                         say=lambda message: _say(progress, message))
                heatmap = ctx.out_dir / HEATMAP_FILE
                if table_due or not heatmap.is_file():
                    write_heatmap(ctx.table, ctx.out_dir)
                snapshot = records(study, ctx.out_dir)
                for hook in hooks:
                    hook.files([ctx.out_dir / TABLE_FILE, heatmap])
                    hook.trials(snapshot)
            if space.screening is not None:
                run_screened(study, ctx, data, budget_left, fine_tune_left,
                             lambda trial, outcome: (tell(study, trial, ctx, outcome), on_done(outcome)))
            elif executor == "local":
                run_local(study, ctx, data, budget_left, on_done)
            elif remaining != 0:
                run_ray(study, rdb, ctx, data, budget_left, on_done, num_samples=remaining, resources=resources,
                        max_concurrent=max_concurrent)
        if space.final.top > 0:
            run_final(study, ctx, data, lambda: records(study, ctx.out_dir), refresh,
                      lambda message: _say(progress, message))
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        final = records(study, ctx.out_dir)
        prune_weights(final, space.objectives)
        for hook in hooks:
            hook.finish(final, status)
    return SearchResult(out_dir=out, study_name=study_name, trials=final, front=pareto_front(final, space.objectives),
                        reference=ctx.reference, info=info, elapsed_s=time.monotonic() - started)


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
    best`, export), and a dominated trial never re-enters it, so these weights are never needed.
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

    def update(self, snapshot: list[TrialRecord], outcome: TrialOutcome) -> None:
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
