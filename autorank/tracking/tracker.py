"""MLflow mirror of a search: a parent run, one nested run per finished trial, the live Pareto front.

The Optuna study is the source of truth, so the tracker never has to be right the first time:
`sync(records)` logs whichever finished trials MLflow lacks (found by the `autorank.trial` tag, so
a trial is logged exactly once however often it is replayed) and whichever final fine-tunes their
runs lack (tag `final`), retags the front (by each trial's `figures`: the final ones where they
exist) and refreshes the front artifacts and any parent files added (the sensitivity table). The search hands it a snapshot after every trial and carries on; a background
thread does the MLflow work (off the critical path of the next trial), retries after an outage,
and `close()` makes a last attempt. Anything still unlogged is written by the next `--resume`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorank.records import SearchCallback, SearchStart, TrialRecord, front_csv, front_json, pareto_front
from autorank.tracking.plots import plot_html, plot_png, plotly_js_name

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PLOT_EVERY_S = 30.0
TRIAL_TAG = "autorank.trial"
SEARCH_TAG = "autorank.search_id"
KIND_TAG = "autorank.kind"
_BATCH = 100  # MLflow's limit of params per log_batch call


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, sessions); autorank's hold runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_KIND = "custom_model_development"


def experiment_id_for(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created when missing; tagged to open in MLflow's classic runs view
    unless it already has a kind."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: CLASSIC_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_KIND)
    return experiment.experiment_id


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


# MLflow's client retries an unreachable server for ~4 minutes per call by default; a search should
# notice an outage in seconds and replay later instead (users can still override these).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class SearchTracker:
    """Logs a search to MLflow; safe to lose (everything is replayable from the study)."""

    def __init__(self, uri: str, *, experiment: str, search_id: str, run_name: str, out_dir: Path,
                 objectives: Sequence[str], reference: Mapping[str, float], limits: Mapping[str, float | None],
                 parent_params: Mapping[str, Any], retry_s: float = 5.0):
        self.uri, self.experiment, self.search_id, self.run_name = uri, experiment, search_id, run_name
        self.out_dir, self.objectives, self.reference = out_dir, list(objectives), dict(reference)
        self.limits, self.parent_params, self.retry_s = dict(limits), dict(parent_params), retry_s
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.logged: dict[int, str] = {}        # trial number -> run id
        self.finals: set[int] = set()           # trials whose final fine-tune is logged on their run
        self.pareto: set[int] = set()
        self.last_error: str | None = None
        self._pending: list[TrialRecord] | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._plotted_front: tuple[int, ...] | None = None
        self._plotly_logged = False  # plotly.js is in the parent run's artifacts (once per search)
        self._plotted_at = float("-inf")
        self._files: list[Path] = []   # parent-run artifacts still to log (the sensitivity table, its heatmap)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> str | None:
        """Create or reopen the parent run and start the background writer; None if unreachable."""
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a search
            self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("MLflow at %s unavailable (%s); results stay in the study and are replayed later",
                        self.uri, self.last_error)
        self._thread = threading.Thread(target=self._loop, name="autorank-tracker", daemon=True)
        self._thread.start()
        return self.parent_id

    def add_files(self, paths: Sequence[Path]) -> None:
        """Files to log on the parent run with the next sync (retried like trials until they are)."""
        with self._cond:
            self._files.extend(paths)

    def submit(self, records: Sequence[TrialRecord]) -> None:
        """Hand over the latest snapshot of all trials; only the newest pending one is processed."""
        with self._cond:
            self._pending = list(records)
            self._cond.notify()

    def close(self, records: Sequence[TrialRecord], *, status: str = "FINISHED", attempts: int = 3) -> list[int]:
        """Stop the thread, sync `records` (retrying), end the parent run; returns unlogged trials."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for attempt in range(attempts):
            try:
                self.sync(records)
                self.client.set_terminated(self.parent_id, status=status)
                break
            except Exception as exc:  # noqa: BLE001
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if attempt + 1 < attempts:
                    time.sleep(min(self.retry_s, 2.0) * (attempt + 1))
        return [r.number for r in records if r.counted and r.number not in self.logged]

    # ---- the work ----------------------------------------------------------------------------
    def sync(self, records: Sequence[TrialRecord], *, final: bool = True) -> None:
        """Log missing finished trials, retag the front, refresh the front artifacts (idempotent).

        The plots are redrawn when the front changed or every `PLOT_EVERY_S` (drawing costs CPU the
        next trial's fine-tune would otherwise have), and always on the final sync."""
        if self.client is None or self.parent_id is None:
            self._connect()
        try:
            self._sync(records, final=final)
        except Exception:
            self.client = None  # reconnect next time: _connect replaces runs half-written by this failure
            raise

    def _sync(self, records: Sequence[TrialRecord], *, final: bool) -> None:
        with self._cond:
            files = list(self._files)
        for path in files:
            self.client.log_artifact(self.parent_id, str(path))
            with self._cond:
                self._files.remove(path)
        for record in records:
            if record.counted and record.number not in self.logged:
                self.logged[record.number] = self._log_trial(record)
            if record.final is not None and record.number in self.logged and record.number not in self.finals:
                self._log_final(record)
                self.finals.add(record.number)
        front = pareto_front(records, self.objectives)
        members = {t.number for t in front}
        for number in (members ^ self.pareto) & set(self.logged):
            self.client.set_tag(self.logged[number], "pareto", "true" if number in members else "false")
        self.pareto = members & set(self.logged)
        self._write_front(records, front, plots=final or self._plots_due(front))
        done = [r for r in records if r.counted]
        feasible = [r for r in done if r.feasible]
        metrics = {"trials_done": len(done), "trials_failed": sum(r.state == "failed" for r in done),
                   "front_size": len(front)}
        if feasible:
            metrics["best_feasible_accuracy"] = max(r.figures["accuracy"] for r in feasible)
        self._log_metrics(self.parent_id, metrics, step=len(done))

    def _connect(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.uri)
        location = (self.out_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
        experiment_id = experiment_id_for(client, self.experiment, location)
        runs = _search_all(client, experiment_id, f"tags.`{SEARCH_TAG}` = '{self.search_id}'", ViewType.ACTIVE_ONLY)
        parent = next((r for r in runs if r.data.tags.get(KIND_TAG) == "search"), None)
        if parent is None:
            parent_run = client.create_run(experiment_id, run_name=self.run_name,
                                           tags={SEARCH_TAG: self.search_id, KIND_TAG: "search"})
            parent_id = parent_run.info.run_id
            _log_params(client, parent_id, self.parent_params)
            self._log_metrics_with(client, parent_id, {f"reference_{k}": v for k, v in self.reference.items()}, 0)
        else:
            parent_id = parent.info.run_id
            client.update_run(parent_id, status="RUNNING")
        has_plotly = parent is not None and any(a.path == plotly_js_name() for a in client.list_artifacts(parent_id))
        logged: dict[int, str] = {}
        for run in runs:
            if run.data.tags.get(KIND_TAG) != "trial":
                continue
            number = int(run.data.tags[TRIAL_TAG])
            if run.info.status in ("FINISHED", "FAILED") and number not in logged:
                logged[number] = run.info.run_id
            else:  # half-written by a crash, or a duplicate: replace it
                client.delete_run(run.info.run_id)
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self._plotly_logged = has_plotly
        self.logged = logged
        tags = {run.info.run_id: run.data.tags for run in runs}
        self.finals = {n for n, run_id in logged.items() if tags[run_id].get("final") in ("true", "failed")}
        self.pareto = {n for n, run_id in logged.items() if tags[run_id].get("pareto") == "true"}

    def _log_trial(self, record: TrialRecord) -> str:
        started = int((record.started or time.time()) * 1000)
        tags = {"mlflow.parentRunId": self.parent_id, SEARCH_TAG: self.search_id, KIND_TAG: "trial",
                TRIAL_TAG: str(record.number), "state": record.state, "pareto": "false",
                "feasible": str(record.feasible).lower()}
        if record.reason:
            tags["reason"] = record.reason[:5000]
        run = self.client.create_run(self.experiment_id, start_time=started, tags=tags,
                                     run_name=f"trial-{record.number:03d}")
        run_id = run.info.run_id
        params: dict[str, Any] = {"summary": record.summary or "-"}
        params.update({f"choice.{k}": v for k, v in record.params.items()})
        for layer, lp in ((record.plan or {}).get("layers") or {}).items():
            params[f"layer.{layer}.method"] = lp.get("method")
            params[f"layer.{layer}.rank"] = "x".join(map(str, lp["rank"])) if isinstance(lp.get("rank"), list) \
                else lp.get("rank")
            params[f"layer.{layer}.precision"] = lp.get("precision")
        if record.plan:
            params["activations"] = record.plan.get("activations")
        _log_params(self.client, run_id, params)
        self._log_metrics(run_id, {**record.metrics, **{f"constraint_{k}": v for k, v in record.constraints.items()},
                                   **{f"screen_{k}": v for k, v in (record.screen or {}).items()}},
                          step=record.number)
        plan_file = self.out_dir / "trials" / str(record.number) / "plan.json"
        if plan_file.is_file():
            self.client.log_artifact(run_id, str(plan_file))
        ended = int((record.finished or time.time()) * 1000)
        self.client.set_terminated(run_id, status="FAILED" if record.state == "failed" else "FINISHED",
                                   end_time=ended)
        return run_id

    def _log_final(self, record: TrialRecord) -> None:
        """The final fine-tune on the trial's run: `final_*` metrics (and constraints), tags `final` (true or
        failed, with `final_reason`) and `feasible` (by the final figures), artifact final.json."""
        run_id = self.logged[record.number]
        if record.finalized:
            self._log_metrics(run_id, {**{f"final_{k}": v for k, v in record.final["metrics"].items()},
                                       **{f"final_constraint_{k}": v for k, v in record.final["constraints"].items()}},
                              step=record.number)
            self.client.set_tag(run_id, "feasible", str(record.feasible).lower())
        else:
            self.client.set_tag(run_id, "final_reason", record.final["reason"][:5000])
        final_file = self.out_dir / "trials" / str(record.number) / "final.json"
        if final_file.is_file():
            self.client.log_artifact(run_id, str(final_file))
        self.client.set_tag(run_id, "final", "true" if record.finalized else "failed")

    def _plots_due(self, front: Sequence[TrialRecord]) -> bool:
        members = tuple(t.number for t in front)
        return members != self._plotted_front or time.monotonic() - self._plotted_at >= PLOT_EVERY_S

    def _write_front(self, records: Sequence[TrialRecord], front: Sequence[TrialRecord], *, plots: bool) -> None:
        (self.out_dir / "pareto.json").write_text(front_json(front, self.objectives, self.reference))
        (self.out_dir / "pareto.csv").write_text(front_csv(front))
        names = ["pareto.json", "pareto.csv"]
        if plots:
            title = f"{self.run_name}: {sum(1 for r in records if r.counted)} trials, {len(front)} on the front"
            plot_png(self.out_dir / "pareto.png", records, front, self.reference, self.limits, title)
            if "ort_latency_ms" in self.reference:  # the search measured deployment latency: accuracy vs it
                fast = pareto_front(records, ["accuracy", "ort_latency_ms"])
                plot_png(self.out_dir / "latency.png", records, fast, self.reference, self.limits,
                         f"{self.run_name}: accuracy vs ONNX Runtime latency, {len(fast)} on that front",
                         x="ort_latency_ms")
                names.append("latency.png")
            plotly_js = plot_html(self.out_dir / "pareto.html", records, front, self.reference, title, self.parent_id)
            self._plotted_front, self._plotted_at = tuple(t.number for t in front), time.monotonic()
            names += ["pareto.png", "pareto.html"]
            if not self._plotly_logged:
                names.append(plotly_js.name)
        for name in names:
            self.client.log_artifact(self.parent_id, str(self.out_dir / name))
        self._plotly_logged = self._plotly_logged or plots

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        self._log_metrics_with(self.client, run_id, metrics, step)

    @staticmethod
    def _log_metrics_with(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                records, self._pending = self._pending, None
            try:
                self.sync(records, final=False)
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - retried with the next snapshot or at close
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("MLflow logging failed (%s); will retry", self.last_error)
                with self._cond:
                    if self._pending is None:
                        self._pending = records
                    self._cond.wait(timeout=self.retry_s)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), str(v)[:6000]) for k, v in params.items() if v is not None]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i:i + _BATCH])


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str, view) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=view,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class MlflowCallback(SearchCallback):
    """The search callback that mirrors a search to MLflow through a `SearchTracker` (the CLI attaches it).

    `uri` defaults to the one search.json records, else the search folder's own sqlite store;
    a resumed search keeps the experiment it started in. Trials MLflow has not received by the end
    are listed in `unlogged` (and on stderr): `--resume` replays them.
    """

    def __init__(self, uri: str | None = None, experiment: str = "autorank"):
        self.uri, self.experiment = uri, experiment
        self.tracker: SearchTracker | None = None
        self.out_dir: Path | None = None
        self.unlogged: list[int] = []

    def start(self, search: SearchStart) -> dict[str, Any]:
        info, out = search.info, search.out_dir.resolve()
        uri = self.uri or info.get("mlflow_uri") or default_tracking_uri(out)
        experiment = info.get("experiment", self.experiment)
        self.out_dir = search.out_dir
        self.tracker = SearchTracker(uri, experiment=experiment, search_id=info["search_id"],
                                     run_name=f"{search.name}-{out.name}", out_dir=out, objectives=search.objectives,
                                     reference=search.reference, limits=search.limits,
                                     parent_params=parent_params(info, search.space, search.executor, out))
        recorded: dict[str, Any] = {"parent_run_id": self.tracker.start()}
        if "mlflow_uri" not in info:  # a new search: where it logs (a resume's --mlflow-uri is for this run only)
            recorded.update(mlflow_uri=uri, experiment=experiment)
        return recorded

    def files(self, paths: Sequence[Path]) -> None:
        self.tracker.add_files(paths)

    def trials(self, records: Sequence[TrialRecord]) -> None:
        self.tracker.submit(records)

    def finish(self, records: Sequence[TrialRecord], status: str) -> None:
        self.unlogged = self.tracker.close(records, status=status)
        if self.unlogged:
            print(f"autorank: MLflow at {self.tracker.uri} did not receive trials {self.unlogged} "
                  f"({self.tracker.last_error}); they are safe in the study: "
                  f"`autorank search --resume --out {self.out_dir}` logs them", file=sys.stderr)


def parent_params(info: Mapping[str, Any], space: Mapping[str, Any], executor: str, out_dir: Path) -> dict[str, Any]:
    """The parent run's params: the search's settings and its resolved space, flattened."""
    flat = {"model": info["model"], "weights": info["weights"], "data": info["data"], "study": info["study_name"],
            "storage": info["storage"], "executor": executor, "out_dir": str(out_dir)}
    for key, value in space.items():
        if isinstance(value, dict):
            flat.update({f"space.{key}.{k}": v for k, v in value.items()})
        else:
            flat[f"space.{key}"] = value
    return flat
