"""Ground level: a search's trials as one record type, their Pareto front, and the search's callbacks.

Search writes these records (from its Optuna study), tracking mirrors them to MLflow and export
picks one; none of them needs the others to read a record, so the type, the front and the hooks
through which a search hands its records on live beneath them all (docs/ARCHITECTURE.md). Nothing
here imports torch, Optuna or MLflow.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.pt"
FINAL_WEIGHTS_FILE = "final.pt"    # a trial's weights after the search's final fine-tune


@dataclass
class TrialRecord:
    """One trial: what it sends back to the search's driver (complete, failed or screened), and as
    read back from the study with its fate, times, folder and final fine-tune."""

    number: int
    state: str                        # complete | failed | screened | interrupted | running | waiting
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    reason: str | None = None
    summary: str = ""
    started: float | None = None      # epoch seconds
    finished: float | None = None
    directory: Path | None = None
    final: dict[str, Any] | None = None   # the final fine-tune: {"metrics", "constraints"} or {"reason"}
    screen: dict[str, float] | None = None  # zero-shot figures of screening (autorank.search.screening)

    @property
    def finalized(self) -> bool:
        """Has figures from the search's final fine-tune (a failed final fine-tune leaves the trial's own)."""
        return self.final is not None and "metrics" in self.final

    @property
    def figures(self) -> dict[str, float]:
        """The figures to compare trials by: the final fine-tune's where it ran, else the trial's own."""
        return self.final["metrics"] if self.finalized else self.metrics

    @property
    def counted(self) -> bool:
        """Counts towards --trials: finished, successfully or not, or screened out (interruptions do not)."""
        return self.state in ("complete", "failed", "screened")

    @property
    def finished_ok(self) -> bool:
        return self.state == "complete"

    @property
    def feasible(self) -> bool:
        constraints = self.final["constraints"] if self.finalized else self.constraints
        return self.finished_ok and all(v <= 0 for v in constraints.values())

    @property
    def weights(self) -> Path | None:
        """The weights that give `figures` (the final fine-tune's where it ran), if kept."""
        if self.directory is None:
            return None
        path = self.directory / (FINAL_WEIGHTS_FILE if self.finalized else WEIGHTS_FILE)
        return path if path.is_file() else None

    @property
    def has_weights(self) -> bool:
        return self.weights is not None

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "state": self.state, "feasible": self.feasible, "metrics": self.metrics,
                "constraints": self.constraints, "screen": self.screen, "final": self.final, "figures": self.figures,
                "params": self.params, "reason": self.reason, "summary": self.summary,
                "plan": self.plan, "dir": str(self.directory) if self.directory else None,
                "weights": str(self.weights) if self.weights else None}

    def to_json(self) -> str:
        """Every field as JSON: how a Ray worker hands its trial's record to the driver."""
        return json.dumps(dict(asdict(self), directory=str(self.directory) if self.directory else None))

    @classmethod
    def from_json(cls, text: str) -> TrialRecord:
        fields = json.loads(text)
        return cls(**dict(fields, directory=Path(fields["directory"]) if fields["directory"] else None))


@dataclass
class SearchStart:
    """What a search tells its callbacks once its study is open, before the first trial (also on --resume)."""

    out_dir: Path                       # the search folder, as the caller named it
    info: dict[str, Any]                # search.json so far: search_id, model, weights, data, study, space, ...
    name: str                           # the search space's name
    space: dict[str, Any]               # the resolved search space (SearchSpace.to_dict())
    executor: str                       # local | ray
    objectives: tuple[str, ...]
    reference: dict[str, float]         # the uncompressed model, fine-tuned as the trials are
    limits: dict[str, float | None]     # max_size, max_drop


class SearchCallback:
    """Hooks a running search calls, as Optuna's optimize(callbacks=...) does; each is a no-op here.

    The search has told its study before it calls a hook, so a callback that falls behind (a
    tracking server that is down) catches up from a later snapshot or on --resume.
    """

    def start(self, search: SearchStart) -> dict[str, Any]:
        """The search (re)starts; returns entries to record in search.json (e.g. where it logs)."""
        return {}

    def files(self, paths: Sequence[Path]) -> None:
        """Search-level files were written (the sensitivity table and its heatmap)."""

    def trials(self, records: Sequence[TrialRecord]) -> None:
        """A snapshot of every trial: at start (what a resume replays) and after each finished trial."""

    def finish(self, records: Sequence[TrialRecord], status: str) -> None:
        """The last snapshot; `status` is FINISHED, or KILLED when the search was interrupted."""


# objective -> Optuna direction; a search's first objective is always accuracy
OBJECTIVES = {"accuracy": "maximize", "size_bytes": "minimize", "params": "minimize", "macs": "minimize",
              "latency_ms": "minimize", "ort_latency_ms": "minimize", "ort_throughput": "maximize"}
# figures predicted from the measured ONNX Runtime latency table (engine.latency), not PyTorch eager
ORT_FIGURES = ("ort_latency_ms", "ort_throughput")


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[str]) -> bool:
    """True when `a` is at least as good as `b` on every objective and better on one."""
    better = False
    for name in objectives:
        sign = 1.0 if OBJECTIVES[name] == "maximize" else -1.0
        va, vb = sign * a[name], sign * b[name]
        if va < vb:
            return False
        better = better or va > vb
    return better


def pareto_front(
    trials: Sequence[TrialRecord], objectives: Sequence[str], *, feasible_only: bool = True
) -> list[TrialRecord]:
    """Non-dominated completed trials (feasible ones only by default), sorted by the first cost.

    Trials are compared by their `figures` (the search's final fine-tune's where it ran). Trials with
    identical objective values are all kept: neither dominates the other.
    """
    pool = [t for t in trials if t.finished_ok and (t.feasible or not feasible_only)
            and all(name in t.figures for name in objectives)]
    front = [t for t in pool if not any(dominates(o.figures, t.figures, objectives) for o in pool if o is not t)]
    cost = objectives[1] if len(objectives) > 1 else objectives[0]
    return sorted(front, key=lambda t: (t.figures[cost], -t.figures["accuracy"], t.number))


FRONT_COLUMNS = ("trial", "accuracy", "size_bytes", "ratio", "drop_points", "params", "macs", "final", "summary")


def front_rows(front: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """One row per front member with the figures a user compares (`final`: after the final fine-tune)."""
    return [{"trial": t.number, "accuracy": t.figures["accuracy"], "size_bytes": int(t.figures["size_bytes"]),
             "ratio": t.figures.get("ratio"), "drop_points": t.figures.get("drop_points"),
             "params": int(t.figures.get("params", 0)), "macs": int(t.figures.get("macs", 0)),
             "final": t.finalized, "summary": t.summary} for t in front]


def front_json(front: Sequence[TrialRecord], objectives: Sequence[str], reference: Mapping[str, Any]) -> str:
    return json.dumps({"objectives": list(objectives), "reference": dict(reference),
                       "front": [dict(row, params_choice=t.params) for row, t in zip(front_rows(front), front)]},
                      indent=2)


def front_csv(front: Sequence[TrialRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FRONT_COLUMNS)
    writer.writeheader()
    writer.writerows(front_rows(front))
    return buffer.getvalue()


def format_front(front: Sequence[TrialRecord], reference: Mapping[str, Any] | None = None) -> str:
    """A plain-text table of the front, for the terminal."""
    lines = [f"{'trial':>5}  {'accuracy':>8}  {'drop':>6}  {'size':>10}  {'ratio':>6}  {'MMACs':>7}  plan"]
    if reference:
        lines.append(f"{'ref':>5}  {reference['accuracy'] * 100:7.2f}%  {'':>6}  {format_size(reference['size_bytes']):>10}"
                     f"  {'1.0x':>6}  {reference.get('macs', 0) / 1e6:7.2f}  uncompressed, same fine-tune")
    for row in front_rows(front):
        drop = f"{row['drop_points']:+.2f}" if row["drop_points"] is not None else ""
        ratio = f"{row['ratio']:.1f}x" if row["ratio"] is not None else ""
        lines.append(f"{row['trial']:>5}  {row['accuracy'] * 100:7.2f}%  {drop:>6}  {format_size(row['size_bytes']):>10}"
                     f"  {ratio:>6}  {row['macs'] / 1e6:7.2f}  {row['summary']}" + ("  (final)" if row["final"] else ""))
    return "\n".join(lines)


def format_size(n: float) -> str:
    """Bytes as B / KB / MB (SI), as the front tables and reports print them."""
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{int(n)} B"
