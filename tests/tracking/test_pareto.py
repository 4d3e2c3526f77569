"""Trial records and the Pareto front: dominance, feasibility, ties, tabular forms, the JSON round trip."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from autorank.records import TrialRecord, dominates, format_front, front_csv, front_json, pareto_front

OBJ = ("accuracy", "size_bytes")


def rec(number, accuracy, size, *, feasible=True, state="complete"):
    return TrialRecord(number=number, state=state, params={}, summary=f"plan {number}",
                       metrics={"accuracy": accuracy, "size_bytes": size, "ratio": 100_000 / size,
                                "drop_points": (0.9 - accuracy) * 100, "params": size / 4, "macs": 1e6},
                       constraints={"max_drop": -1.0 if feasible else 2.0})


def test_dominance_respects_directions():
    assert dominates({"accuracy": 0.9, "size_bytes": 10}, {"accuracy": 0.8, "size_bytes": 20}, OBJ)
    assert dominates({"accuracy": 0.9, "size_bytes": 10}, {"accuracy": 0.9, "size_bytes": 20}, OBJ)
    assert not dominates({"accuracy": 0.9, "size_bytes": 10}, {"accuracy": 0.9, "size_bytes": 10}, OBJ)
    assert not dominates({"accuracy": 0.95, "size_bytes": 30}, {"accuracy": 0.9, "size_bytes": 10}, OBJ)


def test_front_is_the_feasible_non_dominated_set_sorted_by_size():
    trials = [rec(0, 0.90, 50_000), rec(1, 0.85, 20_000), rec(2, 0.80, 30_000),  # 2 dominated by 1
              rec(3, 0.95, 90_000, feasible=False),                              # infeasible
              rec(4, 0.70, 5_000), rec(5, 0.70, 5_000),                           # ties: both kept
              rec(6, 0.99, 1_000, state="failed")]                               # failed never counts
    assert [t.number for t in pareto_front(trials, OBJ)] == [4, 5, 1, 0]
    assert [t.number for t in pareto_front(trials, OBJ, feasible_only=False)] == [4, 5, 1, 0, 3]
    assert pareto_front([rec(0, 0.9, 10, feasible=False)], OBJ) == []


def test_front_tables():
    front = pareto_front([rec(0, 0.90, 50_000), rec(1, 0.85, 20_000)], OBJ)
    rows = list(csv.DictReader(io.StringIO(front_csv(front))))
    assert [int(r["trial"]) for r in rows] == [1, 0] and float(rows[0]["accuracy"]) == 0.85
    data = json.loads(front_json(front, OBJ, {"accuracy": 0.9, "size_bytes": 100_000}))
    assert data["objectives"] == list(OBJ) and [r["trial"] for r in data["front"]] == [1, 0]
    table = format_front(front, {"accuracy": 0.9, "size_bytes": 100_000, "macs": 2e6})
    assert "ref" in table and "plan 1" in table and len(table.splitlines()) == 4


def test_record_survives_the_json_a_ray_worker_sends(tmp_path):
    record = rec(7, 0.88, 40_000, feasible=False)
    record.plan = {"layers": {"conv2": {"method": "tucker2"}}}
    record.screen, record.directory = {"accuracy": 0.5}, tmp_path
    back = TrialRecord.from_json(record.to_json())
    assert back == record and isinstance(back.directory, Path) and not back.feasible
    failed = TrialRecord(number=8, state="failed", params={"all.conv.method": "cp"}, reason="TrialDiverged: nan")
    assert TrialRecord.from_json(failed.to_json()) == failed


def test_accuracy_vs_latency_plot_draws_the_latency_front_and_limit(tmp_path):
    """The tracker's latency.png: accuracy against predicted ONNX Runtime latency, with its own front."""
    from matplotlib.image import imread

    from autorank.tracking.plots import accuracy_figure, plot_png

    trials = [rec(n, acc, 5000 + n) for n, acc in enumerate((0.80, 0.85, 0.70, 0.88))]
    for t, ms in zip(trials, (0.20, 0.35, 0.30, 0.50)):
        t.metrics["ort_latency_ms"] = ms
    front = pareto_front(trials, ["accuracy", "ort_latency_ms"])
    assert [t.number for t in front] == [0, 1, 3]  # trial 2 is slower and less accurate than trial 0
    args = (trials, front, {"accuracy": 0.9, "ort_latency_ms": 0.6}, {"max_latency_ms": 0.4, "max_drop": 5.0},
            "latency")
    ax = accuracy_figure(*args, x="ort_latency_ms").axes[0]
    drawn = {c.get_label(): c.get_offsets().data.tolist() for c in ax.collections}
    assert drawn["Pareto front"] == [[0.20, 80.0], [0.35, 85.0], [0.50, 88.0]]
    assert drawn["uncompressed (same fine-tune)"] == [[0.6, 90.0]]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["max latency ms"].get_xdata()) == [0.4, 0.4]
    assert list(lines["max drop"].get_ydata()) == [85.0, 85.0]
    assert not ax.get_xscale() == "log" and "latency" in ax.get_xlabel()
    path = tmp_path / "latency.png"
    plot_png(path, *args, x="ort_latency_ms")
    assert imread(path).shape == (450, 700, 4)
