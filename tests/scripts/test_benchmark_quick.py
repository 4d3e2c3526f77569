"""scripts/benchmark_compression.py: the hypervolume helper and the report built from cached JSON alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_compression.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_compression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hypervolume_matches_hand_computed_area(bench):
    # Two non-dominated points against ref (1, 0): 0.8 * 5 + 0.5 * (8 - 5) = 5.5
    assert bench.hypervolume([(0.2, 5.0), (0.5, 8.0)], (1.0, 0.0)) == pytest.approx(5.5)
    # A dominated point, a point beyond the size bound and one below the accuracy floor add nothing.
    assert bench.hypervolume([(0.2, 5.0), (0.5, 8.0), (0.6, 4.0), (1.2, 9.0), (0.1, -1.0)], (1.0, 0.0)) == \
        pytest.approx(5.5)
    # Order does not matter; an extra non-dominated point adds exactly its own rectangle.
    assert bench.hypervolume([(0.5, 8.0), (0.05, 2.0), (0.2, 5.0)], (1.0, 0.0)) == pytest.approx(5.5 + 0.15 * 2.0)
    assert bench.hypervolume([], (1.0, 0.0)) == 0.0
    assert bench.hypervolume([(0.0, 10.0)], (1.0, 0.0)) == pytest.approx(10.0)


def test_hv_units_are_points_times_size_fraction(bench):
    reference = {"test_accuracy": 0.90, "size_bytes": 1000}
    rows = [{"test_accuracy": 0.90, "size_bytes": 500}, {"test_accuracy": 0.85, "size_bytes": 100}]
    # floor = 90 - 10 = 80 points: 0.9 * (85 - 80) + 0.5 * (90 - 85) = 7.0
    assert bench.hv_of(rows, "test_accuracy", reference) == pytest.approx(7.0)


def test_front_and_spread(bench):
    rows = [{"name": n, "val_accuracy": a, "size_bytes": s}
            for n, a, s in [("a", 0.9, 100), ("b", 0.8, 200), ("c", 0.95, 300), ("d", 0.7, 50)]]
    assert [r["name"] for r in bench.front(rows, "val_accuracy")] == ["d", "a", "c"]  # b is dominated by a
    assert bench.spread(list(range(9)), 3) == [0, 4, 8]
    assert bench.spread([1, 2], 3) == [1, 2]


def test_final_choice_takes_the_one_point_boundary_then_spreads(bench):
    rows = [{"name": n, "val_accuracy": a, "size_bytes": z} for n, a, z in
            [("tiny", 0.60, 10), ("small", 0.88, 20), ("mid", 0.915, 40), ("big", 0.925, 80), ("dominated", 0.5, 90)]]
    # reference 92.0% val: "mid" (-0.5 pt) is the smallest within 1 point, "small" and "tiny" the next smaller
    assert [r["name"] for r in bench.final_choice(rows, 0.92, 3)] == ["mid", "small", "tiny"]
    assert [r["name"] for r in bench.final_choice(rows, 0.92, 2)] == ["mid", "small"]
    # reference 93.0%: only "big" is within; then "mid" and "small" below it
    assert [r["name"] for r in bench.final_choice(rows, 0.93, 3)] == ["big", "mid", "small"]
    # nothing within 1 point: an even spread of the front
    assert [r["name"] for r in bench.final_choice(rows, 0.99, 3)] == ["tiny", "mid", "big"]
    # the smallest model is already within: it and the spread
    assert [r["name"] for r in bench.final_choice(rows, 0.61, 3)] == ["tiny", "mid", "big"]
    # reaching 4 points (the search's max_drop): the sure "mid", then the smallest within 4 points
    # ("small", -4.0 pt) before the spread; "tiny" (-32 pt) is beyond reach
    assert [r["name"] for r in bench.final_choice(rows, 0.92, 2, reach=4.0)] == ["mid", "small"]
    assert [r["name"] for r in bench.final_choice(rows, 0.93, 3, reach=5.0)] == ["big", "small", "mid"]
    assert [r["name"] for r in bench.final_choice(rows, 0.93, 2, reach=5.0)] == ["big", "small"]


def _model(bench, name, family, method, rank, precision, val, test, size, params, **extra):
    return bench.row(name, family, method, rank, precision,
                     {"accuracy": val, "size_bytes": size, "params": params, "macs": 40_000_000}, test, val - 0.1,
                     config={"steps": 10, "val_limit": 500, "test_limit": 1000, "final_steps": 20}, **extra)


def _write_runs(bench, out: Path) -> None:
    runs = out / "runs"
    ref = _model(bench, "reference", "Reference", "none", None, "fp32", 0.93, 0.88, 1_000_000, 250_000)
    ref["pretrained_test"] = 0.878
    bench.write_json(runs / "reference" / "reference.json", ref)
    for name, fam, method, rank, prec, val, test, size in [
        ("tucker2-0.2-fp32", "Tucker-2", "tucker2", 0.2, "fp32", 0.90, 0.860, 200_000),
        ("tucker2-0.2-int8", "Tucker-2", "tucker2", 0.2, "int8", 0.89, 0.850, 60_000),
        ("cp-0.2-fp32", "CP", "cp", 0.2, "fp32", 0.88, 0.840, 200_000),
        ("none-int8", "INT8 only", "none", None, "int8", 0.93, 0.875, 260_000),
        ("ptq-int8", "INT8 only", "none", None, "int8", 0.925, 0.872, 260_000),
    ]:
        bench.write_json(runs / "baselines" / f"{name}.json",
                         _model(bench, name, fam, method, rank, prec, val, test, size, size // 4,
                                wall_s=10.0, finetuned=name != "ptq-int8"))
    trial = _model(bench, "search-3", "Search", "search", None, "mixed", 0.92, 0.871, 120_000, 100_000)
    trial.update(trial=3, summary="tucker2 x3 | int8 x3")
    bench.write_json(runs / "search" / "trial-3.json", trial)
    trials = [{"trial": i, "state": s, "val_accuracy": a, "size_bytes": z, "wall_s": 10.0}
              for i, s, a, z in [(0, "complete", 0.90, 300_000), (1, "failed", None, None), (2, "complete", 0.85, 100_000),
                                 (3, "complete", 0.92, 120_000)]]
    bench.write_json(runs / "search" / "summary.json", {"trials": trials, "trials_budget": 4, "elapsed_s": 95.0,
                                                        "fine_tune_steps": 30, "table_s": 20.0,
                                                        "time_budget_s": 100.0,
                                                        "reference": {"accuracy": 0.93, "size_bytes": 1_000_000}})
    for name, fam, test, size in [("reference", "Reference", 0.885, 1_000_000), ("search-3", "Search", 0.876, 120_000),
                                  ("tucker2-0.2-int8", "Tucker-2", 0.874, 60_000),
                                  ("none-int8", "INT8 only", 0.880, 260_000)]:
        final = _model(bench, f"final-{name}", fam, "none", None, "mixed", 0.9, test, size, size // 4)
        final["wall_s"] = 7.0
        bench.write_json(runs / "final" / f"{name}.json", final)
    other_seed = [{"trial": i, "state": s, "val_accuracy": a, "size_bytes": z, "wall_s": 10.0}
                  for i, s, a, z in [(0, "complete", 0.88, 200_000), (1, "complete", 0.90, 400_000),
                                     (2, "failed", None, None), (3, "failed", None, None)]]
    for seed, seed_trials in ((0, trials), (1, other_seed)):
        bench.write_json(runs / "efficiency" / f"allocate+tpe+seeds-seed{seed}.json",
                         {"trials": seed_trials, "sampler": "tpe", "evbmf_seeds": True, "mode": "allocate",
                          "elapsed_s": 40.0,
                          "reference": {"accuracy": 0.93, "size_bytes": 1_000_000}})
    bench.write_json(runs / "findings" / "tucker2-int8-layers.json", {
        "ratio": 0.2, "base_val": 0.93, "config": {"layer_val_limit": 300},
        "layers": {"layer1.0.conv1": {"ranks": [4, 4], "tucker2_drop": 1.0, "w8_drop": 0.2, "tucker2_w8_drop": 1.5,
                                      "w8a8_drop": 0.4, "tucker2_w8a8_drop": 1.4}}})


def test_allocate_variants_of_a_seed_share_the_first_measured_table(bench, tmp_path):
    allocate = [label for label, (mode, _, _) in bench.EFF_VARIANTS.items() if mode == "allocate"]
    layers = [label for label, (mode, _, _) in bench.EFF_VARIANTS.items() if mode != "allocate"]
    holder = SimpleNamespace(out=tmp_path)

    def measure(label: str, seed: int) -> Path:
        table = tmp_path / "efficiency" / f"{label}-seed{seed}" / "sensitivity.json"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text("{}")
        return table

    measure(layers[0], 0)  # a layers-mode folder's table is never shared
    assert bench.Bench.measured_table(holder, 0) is None
    later = measure(allocate[-1], 0)
    assert bench.Bench.measured_table(holder, 0) == later
    first = measure(allocate[0], 0)
    assert bench.Bench.measured_table(holder, 0) == first   # the first in EFF_VARIANTS' order
    assert bench.Bench.measured_table(holder, 1) is None    # another seed's images: not shared


def test_report_from_cached_json(bench, tmp_path):
    out = tmp_path / "bench"
    _write_runs(bench, out)
    docs = tmp_path / "docs"
    docs.mkdir()
    sections = bench.build_report(out, "resnet20-quick", "python scripts/benchmark_compression.py run --quick", docs)

    table = sections["baselines"]
    for name in ("reference", "tucker2-0.2-fp32", "tucker2-0.2-int8", "cp-0.2-fp32", "none-int8", "ptq-int8"):
        assert f"| {name} |" in table
    assert "| Tucker-2 | tucker2-0.2-int8 | 60,000 | 16.67x | 15,000 | 40.00 | 85.00 | +3.00 |" in table
    # Hypervolume of the Tucker-2 front on test: floor 78 pts; (1-0.06)*(85-78) + (1-0.2)*(86-85) = 7.38
    assert "| Tucker-2 | 2 | 7.380 |" in table
    # Smallest within 1.0 point of 88.0: the search model (87.1 at 120 KB); for INT8 only, the 260 KB models.
    search_line = next(line for line in table.splitlines() if line.startswith("| Search | 1 |"))
    assert "tucker2 x3 \\| int8 x3" in search_line and "120.0 KB" in search_line
    assert next(line for line in table.splitlines() if line.startswith("| Tucker-2 | 2 |")).count("none") == 1
    assert "2 completed" not in table and "3 completed" in table
    png = docs / "benchmark_resnet20_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    eff = sections["efficiency"]
    # HV curve: trial 0 -> (1-0.3)*(90-83) = 4.9; trial 2 adds (1-0.1)*(85-83) -> 4.9+1.8 (0.9*2) = 6.7, then
    # trial 3 (0.12, 92) dominates trial 2: 0.88*9 + 0.7*0 (90<92 ... ) -> recomputed exactly below.
    expected = bench.hypervolume([(0.3, 90.0), (0.1, 85.0), (0.12, 92.0)], (1.0, 83.0))
    assert expected == pytest.approx(0.9 * 2 + 0.88 * 7)  # (0.3, 90) is dominated by (0.12, 92)
    # Seed 1: (0.2, 88) and (0.4, 90) -> 0.8 * 5 + 0.6 * 2 = 5.2; mean and sample sd over the two seeds.
    assert "| allocate+tpe+seeds | allocate | tpe | yes | 2 | 4 |" in eff and "| 6.580 ± 1.952 |" in eff
    assert "run --model resnet20 --quick --stages efficiency --eff-seeds 0,1`" in eff
    assert f"| allocate+tpe+seeds | {expected:.3f} | 5.200 |" in eff
    assert (docs / "benchmark_resnet20_quick_efficiency.png").is_file()

    findings = sections["findings"]
    # Tucker-2 + int8 whole network: drops 2.0 (fp32), 0.5 (int8 alone), sum 2.5, joint 3.0, residual +0.5.
    assert "| 0.2 | +2.00 | +0.50 | +2.50 | +3.00 | +0.50 |" in findings
    assert "| layer1.0.conv1 | [4, 4] | +1.00 | +0.20 | +1.50 | +1.20 |" in findings


def test_summary_json_hypervolumes_smallest_within_and_compute(bench, tmp_path):
    out = tmp_path / "bench"
    _write_runs(bench, out)
    summary = bench.summary_json(out)
    reference = {"test_accuracy": 0.88, "size_bytes": 1_000_000}
    assert summary["hypervolume"]["search"] == pytest.approx(
        bench.hv_of([{"test_accuracy": 0.871, "size_bytes": 120_000}], "test_accuracy", reference), abs=1e-4)
    assert summary["hypervolume"]["Tucker-2"] == pytest.approx(7.38)
    assert set(summary["hypervolume"]) == {"search", "baselines", "INT8 only", "Tucker-2", "CP"}
    assert summary["hypervolume"]["baselines"] >= max(summary["hypervolume"][k] for k in ("INT8 only", "Tucker-2", "CP"))
    # After the final fine-tune the reference is 88.5%: within 1 point are the search model (87.6%, 120 KB)
    # and int8 (88.0%, 260 KB); Tucker-2 + int8 (87.4%) is 1.1 points below and does not count.
    assert summary["reference_test_accuracy"] == 0.885
    within = summary["smallest_within_1pt"]
    assert within["search"]["ratio"] == pytest.approx(1_000_000 / 120_000, abs=1e-3)
    assert within["best_baseline"]["family"] == "INT8 only" and within["best_baseline"]["ratio"] == pytest.approx(
        1_000_000 / 260_000, abs=1e-3)
    # Steps: 30 trial steps + the search's reference (10) + one final model (20); baselines 4 x 10 + 2 x 20.
    assert summary["compute"] == {"search_steps": 60, "baseline_steps": 80, "search_wall_s": 102.0,
                                  "baseline_wall_s": 64.0, "search_table_s": 20.0, "search_trials": 4}


def test_update_docs_replaces_only_marked_sections(bench, tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("intro\n<!-- bench:t:baselines:begin -->\nold\n<!-- bench:t:baselines:end -->\n## Other\nkept\n")
    missing = bench.update_docs(doc, "t", {"baselines": "new table", "efficiency": "x"})
    text = doc.read_text()
    assert missing == ["efficiency"]
    assert "new table" in text and "old" not in text and text.endswith("## Other\nkept\n") and text.startswith("intro\n")
    json.dumps(missing)
