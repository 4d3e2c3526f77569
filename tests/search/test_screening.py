"""Multi-fidelity screening: the MO-ASHA promotion rule (simulated, seeded) and a screened search on digits."""

from __future__ import annotations

import random

import pytest
import yaml

from autorank.records import dominates
from autorank.search import load_search
from autorank.search.run import run_search
from autorank.search.screening import nondominated_ranks, promotion_order, promotions
from autorank.tracking import MlflowCallback
from tests.search.conftest import TINY_SPACE

OBJECTIVES = ("accuracy", "size_bytes")


def test_nondominated_sorting_and_promotion_order():
    figures = {0: {"accuracy": 0.9, "size_bytes": 100}, 1: {"accuracy": 0.8, "size_bytes": 50},
               2: {"accuracy": 0.8, "size_bytes": 100}, 3: {"accuracy": 0.7, "size_bytes": 200},
               4: {"accuracy": 0.95, "size_bytes": 300}}
    assert nondominated_ranks(figures, OBJECTIVES) == {0: 0, 1: 0, 4: 0, 2: 1, 3: 2}
    order = promotion_order(figures, OBJECTIVES)
    assert set(order[:3]) == {0, 1, 4} and order[3:] == [2, 3]
    # the front's extremes (infinite crowding distance) come before its middle member
    assert order[2] == 0


@pytest.mark.parametrize("seed", range(5))
def test_no_candidate_is_fine_tuned_while_one_that_dominates_it_was_screened_out(seed):
    """Batches of random screen figures (with ties), promoted by the search's rule: at every point, a
    fine-tuned candidate is dominated by no screened-out one, and each batch promotes its best first."""
    rng = random.Random(seed)
    figures, promoted, screened_out = {}, [], []
    for batch_no in range(12):
        batch = list(range(len(figures), len(figures) + rng.randint(1, 6)))
        for n in batch:
            figures[n] = {"accuracy": rng.choice([0.5, 0.6, 0.7, 0.8, 0.9, rng.random()]),
                          "size_bytes": rng.choice([100, 200, 300, rng.randint(50, 400)])}
        chosen = promotions(figures, batch, promoted, screened_out, OBJECTIVES, keep=0.3)
        order = promotion_order(figures, OBJECTIVES)
        assert chosen == [n for n in order if n in chosen]  # most promotable first
        promoted += chosen
        screened_out += [n for n in batch if n not in chosen]
        for p in promoted:
            assert not any(dominates(figures[s], figures[p], OBJECTIVES) for s in screened_out), (batch_no, p)
        ranks = nondominated_ranks(figures, OBJECTIVES)
        best_of_batch = min(batch, key=lambda n: order.index(n))
        if ranks[best_of_batch] == 0 and not any(dominates(figures[s], figures[best_of_batch], OBJECTIVES)
                                                  for s in screened_out):
            assert best_of_batch in chosen  # a globally non-dominated newcomer is always fine-tuned
    assert 0 < len(promoted) < len(figures)


SCREEN_SPACE = {
    "name": "tinyscreen",
    "mode": "allocate",
    "methods": ["none", "tucker2", "svd"],
    "precisions": ["fp32", "int8", "int4"],
    "sensitivity": {"images": 120, "levels": [2, 4], "fit_images": 32},
    "allocate": {"ratio": [2.0, 16.0]},
    "screening": {"images": 120, "batch": 4, "keep": 0.5},
    "constraints": {"max_drop": 5.0},
    "finetune": {"steps": 8, "lr": 0.05, "batch_size": 64, "decompose_iters": 5, "fit_images": 64},
    "search": {"trials": 10, "population": 4, "seed": 0, "seed_ratios": [0.5], "steps_budget": 48},
}


def test_screened_search_records_both_fidelities_and_respects_the_steps_budget(tmp_path, pretrained_digits,
                                                                               digits):
    space = tmp_path / "screen.yaml"
    space.write_text(yaml.safe_dump(SCREEN_SPACE))
    out = tmp_path / "search"
    run_search(space, "small_cnn", pretrained_digits, "digits", out, data=digits, progress=False,
               callbacks=[MlflowCallback()])
    search = load_search(out)
    trials = [t for t in search.trials if t.counted]
    warm = trials[:3]  # int8, the EVBMF target, Tucker-2 at 50%: fine-tuned without a screen
    assert all(t.state == "complete" and t.screen is None for t in warm)
    candidates = trials[3:]
    screened_out = [t for t in candidates if t.state == "screened"]
    tuned = [t for t in candidates if t.state in ("complete", "failed")]
    assert screened_out and tuned and all(t.screen is not None for t in candidates)
    # every fine-tune counted against the budget: 48 steps = 6 fine-tunes of 8 steps, warm starts included
    assert len(warm) + len(tuned) <= 6
    for t in tuned:  # both fidelities recorded; the fine-tuned figures are the trial's objectives
        assert t.screen["size_bytes"] == t.metrics["size_bytes"] and t.screen["images"] == 120
        assert not any(dominates(s.screen, t.screen, OBJECTIVES) for s in screened_out if s.number < t.number)
    for t in screened_out:
        assert t.metrics == {} and t.plan is not None and not t.has_weights
    from mlflow import MlflowClient

    client = MlflowClient(search.info["mlflow_uri"])
    experiment = client.get_experiment_by_name("autorank")
    runs = {int(r.data.tags["autorank.trial"]): r for r in client.search_runs(
        [experiment.experiment_id], f"tags.`autorank.kind` = 'trial' and tags.`autorank.search_id` = "
                                    f"'{search.info['search_id']}'")}
    assert sorted(runs) == [t.number for t in trials]
    for t in candidates:
        run = runs[t.number]
        assert run.data.metrics["screen_accuracy"] == pytest.approx(t.screen["accuracy"])
        assert run.data.tags["state"] == t.state and run.info.status == ("FAILED" if t.state == "failed" else "FINISHED")
        assert ("accuracy" in run.data.metrics) == (t.state == "complete")


def test_screening_with_the_ray_executor_is_refused_before_compute(tmp_path, capsys):
    from autorank.cli import main

    space = tmp_path / "screen.yaml"
    space.write_text(yaml.safe_dump(SCREEN_SPACE))
    out = tmp_path / "out"
    assert main(["search", "--config", str(space), "--model", "small_cnn", "--data", "digits", "--out", str(out),
                 "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "screening runs with --executor local only" in err
    assert not out.exists()


def test_a_screened_search_ranks_screens_on_ort_latency(tmp_path, monkeypatch, pretrained_digits, digits):
    """An `ort_*` objective is a screen figure too (promotion ranks on every objective): predicted from
    the search's latency table, it is already the fine-tuned trial's, as size is."""
    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "screen.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, "objectives": ["accuracy", "ort_latency_ms"],
                                     "finetune": {**TINY_SPACE["finetune"], "steps": 2},
                                     "screening": {"images": 120, "batch": 2, "keep": 0.5},
                                     "latency": {"threads": 1, "batch_size": 16},
                                     "search": {**TINY_SPACE["search"], "trials": 4}}))
    out = tmp_path / "search"
    run_search(space, "small_cnn", pretrained_digits, "digits", out, data=digits, progress=False)
    candidates = [t for t in load_search(out).trials if t.counted and t.screen is not None]
    assert len(candidates) >= 2 and {t.state for t in candidates} >= {"screened"}
    assert all(t.screen["ort_latency_ms"] > 0 for t in candidates)
    for t in candidates:
        if t.state == "complete":
            assert t.screen["ort_latency_ms"] == t.metrics["ort_latency_ms"]
            assert t.screen["size_bytes"] == t.metrics["size_bytes"]
