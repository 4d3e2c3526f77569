"""Reading a search back: its trials as records (`autorank.records.TrialRecord`), and the best feasible one.

The Optuna study is the source of truth (every finished trial is told to it before anything else
happens); `search.json` says where the study lives and what the uncompressed reference scored.
Export, `autorank best` and the tracker all read trials through `load_search`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from autorank.errors import AutorankError
from autorank.records import WEIGHTS_FILE, TrialRecord
from autorank.search.space import Constraints, SearchSpace, space_from_dict

if TYPE_CHECKING:
    from torch import nn

    from autorank.compression import Plan
    from autorank.data import Dataset

SEARCH_FILE = "search.json"
TRIALS_DIR = "trials"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.json"
FINAL_FILE = "final.json"
FINAL_ATTR = "final:"              # study user attr `final:<n>`: trial n's final figures (finished trials are frozen)
FINAL_REFERENCE_ATTR = "final_reference"


def record_from_trial(trial: FrozenTrial, out_dir: Path | None = None,
                      study_attrs: dict[str, Any] | None = None) -> TrialRecord:
    """A TrialRecord from Optuna's frozen trial (user attrs hold metrics, plan and reason; the study's
    user attrs `study_attrs` hold the final fine-tune's figures)."""
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        state = "complete"
    elif trial.state == TrialState.FAIL:
        state = "interrupted" if attrs.get("interrupted") else "failed"
    elif trial.state == TrialState.PRUNED:
        state = "screened"
    else:
        state = trial.state.name.lower()
    plan = attrs.get("plan")
    return TrialRecord(
        number=trial.number, state=state, params=dict(trial.params), metrics=dict(attrs.get("metrics", {})),
        constraints=dict(trial.constraints), plan=json.loads(plan) if isinstance(plan, str) else plan,
        reason=attrs.get("reason"), summary=attrs.get("summary", ""),
        started=trial.datetime_start.timestamp() if trial.datetime_start else None,
        finished=trial.datetime_complete.timestamp() if trial.datetime_complete else None,
        directory=(out_dir / TRIALS_DIR / str(trial.number)) if out_dir is not None else None,
        final=(study_attrs or {}).get(f"{FINAL_ATTR}{trial.number}"), screen=attrs.get("screen"),
    )


@dataclass
class SearchRecord:
    """A search folder read back: its settings, reference and trials."""

    out_dir: Path
    info: dict[str, Any]
    space: SearchSpace
    trials: list[TrialRecord]

    final_reference: dict[str, float] | None = None   # the uncompressed model after the final fine-tune too

    @property
    def reference(self) -> dict[str, float]:
        return self.info["reference"]

    def reference_for(self, trial: TrialRecord) -> dict[str, float]:
        """The reference `trial.figures` compare with: the same total fine-tune."""
        return self.final_reference if trial.finalized and self.final_reference else self.reference

    def trial(self, number: int) -> TrialRecord:
        for record in self.trials:
            if record.number == number:
                return record
        raise AutorankError(f"trial {number} is not in the search at {self.out_dir}")


def read_info(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / SEARCH_FILE
    if not path.is_file():
        raise AutorankError(f"{out_dir} holds no search ({SEARCH_FILE} missing): run `autorank search --out {out_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AutorankError(f"{path} is corrupt: {exc}") from None


def storage_for(url: str, attempts: int = 5) -> optuna.storages.BaseStorage:
    """An RDB storage; sqlite waits for locks instead of failing under a concurrent reader.

    Opening a storage creates its schema when the database is new, so a reader that opens a search's
    study while the search is creating it races the search: the loser's CREATE/INSERT fails. It then
    retries, and finds the schema the winner finished.
    """
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(1, attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            time.sleep(0.05 * attempt)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def open_study(info: dict[str, Any], out_dir: Path) -> optuna.Study:
    """The search's Optuna study, read from the storage recorded in search.json."""
    storage = info["storage"]
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_absolute():
        storage = f"sqlite:///{(out_dir / storage.removeprefix('sqlite:///')).resolve()}"
    try:
        return optuna.load_study(study_name=info["study_name"], storage=storage_for(storage))
    except KeyError:
        raise AutorankError(f"study {info['study_name']!r} not found in {info['storage']}") from None


def load_search(out_dir: str | Path) -> SearchRecord:
    """Read a search folder: search.json plus every trial of its study."""
    out = Path(out_dir)
    info = read_info(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(info, out)
    attrs = study.user_attrs
    trials = [record_from_trial(t, out, attrs) for t in study.get_trials(deepcopy=False)]
    return SearchRecord(out_dir=out, info=info, space=space_from_dict(info["space"]), trials=trials,
                        final_reference=attrs.get(FINAL_REFERENCE_ATTR))


def best_trial(
    search: SearchRecord | str | Path,
    *,
    max_size: int | None = None,
    min_ratio: float | None = None,
    max_drop: float | None = None,
    max_latency_ms: float | None = None,
) -> TrialRecord:
    """The most accurate completed trial meeting the constraints (the search's own where not given).

    Trials are compared by their `figures` (the final fine-tune's where it ran, against the reference
    fine-tuned alike). Ties on accuracy go to the smaller model. Infeasible trials are never returned:
    with none feasible, AutorankError says which limit nothing met.
    """
    record = search if isinstance(search, SearchRecord) else load_search(search)
    own = record.space.constraints
    limits = Constraints(
        max_size=max_size if max_size is not None else own.max_size,
        min_ratio=min_ratio if min_ratio is not None else own.min_ratio,
        max_drop=max_drop if max_drop is not None else own.max_drop,
        max_latency_ms=max_latency_ms if max_latency_ms is not None else own.max_latency_ms,
    )
    done = [t for t in record.trials if t.finished_ok and _finite(t.figures)]
    if not done:
        raise AutorankError(f"the search at {record.out_dir} has no completed trials yet")
    feasible = [t for t in done
                if all(v <= 0 for v in limits.violations(t.figures, record.reference_for(t)).values())]
    if not feasible:
        raise AutorankError(f"none of the {len(done)} completed trials meets {limits.describe()}")
    return max(feasible, key=lambda t: (t.figures["accuracy"], -t.figures["size_bytes"], -t.number))


@dataclass
class RebuiltTrial:
    """A trial's compressed model rebuilt from its saved weights, and what it was built from."""

    search: SearchRecord
    record: TrialRecord
    data: Dataset
    pretrained: nn.Module          # the search's model with its pretrained weights (eval mode)
    plan: Plan                     # the trial's resolved plan (integer ranks)
    model: nn.Module               # compressed by `plan`, holding the trial's weights (eval mode)


def rebuild_trial(search_dir: str | Path, *, trial: int | None = None, max_size: int | None = None,
                  min_ratio: float | None = None, max_drop: float | None = None,
                  max_latency_ms: float | None = None) -> RebuiltTrial:
    """A trial of the search at `search_dir` rebuilt without retraining (what export and scripts start from).

    The weights are the final fine-tune's where the search ran one for the trial (`record.weights`).
    With `trial=None` the most accurate feasible trial is chosen by `best_trial` within the limits.
    Every user mistake (no search, no such trial, no weights) is an AutorankError before any compute.
    """
    search = load_search(search_dir)
    if not search.trials:
        raise AutorankError(f"the search at {search_dir} has no trials: nothing to export")
    if trial is not None:
        record = search.trial(trial)
        if not record.finished_ok:
            raise AutorankError(f"trial {trial} did not complete ({record.state}"
                                + (f": {record.reason}" if record.reason else "") + "): nothing to export")
    else:
        record = best_trial(search, max_size=max_size, min_ratio=min_ratio, max_drop=max_drop,
                            max_latency_ms=max_latency_ms)
    if not record.has_weights or not (record.directory / PLAN_FILE).is_file():
        kept = sorted(t.number for t in search.trials if t.has_weights)
        raise AutorankError(
            f"trial {record.number} has no saved weights in {record.directory} (only Pareto-front trials keep "
            f"{WEIGHTS_FILE}); trials with weights: {', '.join(map(str, kept)) or 'none'}")
    # torch and the pipeline only from here: reading a search (`autorank best`) stays light
    import torch

    from autorank.compression import Plan, load_compressed
    from autorank.data import load_data
    from autorank.models import create_model

    info = search.info
    data = load_data(info["data"], seed=search.space.seed)
    pretrained = create_model(info["model"], data, info["weights"]).eval()
    plan = Plan.from_json((record.directory / PLAN_FILE).read_text())
    state = torch.load(record.weights, map_location="cpu", weights_only=True)
    try:
        model = load_compressed(pretrained, plan, state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise AutorankError(f"trial {record.number}'s weights do not fit its plan: {first}") from None
    return RebuiltTrial(search, record, data, pretrained, plan, model.eval())


def _finite(metrics: dict[str, float]) -> bool:
    return all(isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])
               for k in ("accuracy", "size_bytes"))
