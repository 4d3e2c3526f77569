"""`kill -9` of a running search, then `--resume`: nothing finished is lost or repeated.

The search is killed while a trial is running (after at least two have finished); the resumed
search must keep the finished trials exactly as they were, finish the requested number, and leave
Optuna and MLflow agreeing trial for trial. With Ray, two trials run concurrently, so the kill hits
two running trials and the resumed part shows concurrent trials recorded exactly once.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.reliability.searches import assert_study_and_mlflow_agree, kill_group, run_cli, start_cli, trial_states, wait_for, write_space

TRIALS = 6


def _kill_mid_trial(tmp_path, executor_args: list[str], timeout: float) -> tuple[dict, dict]:
    out = tmp_path / "search"
    space = write_space(tmp_path, trials=TRIALS)
    log = tmp_path / "search.log"
    proc = start_cli(["search", "--config", str(space), "--model", "small_cnn", "--data", "digits",
                      "--out", str(out), "--no-progress", *executor_args], log)
    try:
        def two_done_one_running():
            """>= 2 finished trials and one running"""
            states = trial_states(out)
            done = sum(s in ("complete", "failed") for s in states.values())
            return states if done >= 2 and "running" in states.values() else None

        wait_for(two_done_one_running, timeout, proc, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer or `kill -9` would
        proc.wait(timeout=30)
    finally:
        kill_group(proc)  # whatever the driver left behind (Ray's helpers)
    from autorank.search import load_search

    before = {t.number: t for t in load_search(out).trials}
    assert any(t.state == "running" for t in before.values())
    return before, {"out": out, "space": space}


def _check_resumed(tmp_path, before: dict, out) -> None:
    from autorank.search import load_search

    after = {t.number: t for t in load_search(out).trials}
    for number, trial in before.items():
        if trial.counted:  # kept once, unchanged
            assert after[number].state == trial.state and after[number].metrics == trial.metrics
        elif trial.state == "running":  # marked interrupted (not counted), its stored choices run again
            assert after[number].state == "interrupted"
            assert any(trial.params.items() <= t.params.items() and t.counted
                       for t in after.values() if t.number > number)
    assert_study_and_mlflow_agree(out, TRIALS)
    assert not any((out / "trials" / str(n)).exists() for n, t in after.items() if t.state == "interrupted")


@pytest.mark.slow
def test_kill9_local_search_then_resume_loses_nothing(tmp_path):
    before, paths = _kill_mid_trial(tmp_path, ["--executor", "local"], timeout=300)
    resumed = run_cli(["search", "--resume", "--out", str(paths["out"]), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_resumed(tmp_path, before, paths["out"])


@pytest.mark.slow
def test_kill9_ray_search_with_concurrent_trials_then_resume_loses_nothing(tmp_path):
    ray = ["--executor", "ray", "--max-concurrent", "2", "--trial-resources", "cpu=1"]
    before, paths = _kill_mid_trial(tmp_path, ray, timeout=400)
    resumed = run_cli(["search", "--resume", "--out", str(paths["out"]), "--no-progress", *ray])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_resumed(tmp_path, before, paths["out"])

    from autorank.search import load_search

    trials = [t for t in load_search(paths["out"]).trials if t.counted and t.number not in before]
    overlapping = [(a.number, b.number) for a in trials for b in trials
                   if a.number < b.number and a.started < b.finished and b.started < a.finished]
    assert overlapping, "the Ray executor ran no two trials at the same time"


TABLE_SPACE = """\
name: table
mode: allocate
methods: [none, tucker2, tt, svd]
precisions: [fp32, int8, int4]
sensitivity: {images: 180, levels: [2, 4, 8], fit_images: 128}
constraints: {max_drop: 50.0}
finetune: {steps: 4, batch_size: 32, fit_images: 64}
search: {sampler: random, trials: 2, seed: 0, seeds: false}
"""


@pytest.mark.slow
def test_kill9_while_measuring_the_sensitivity_table_then_resume_keeps_the_finished_rows(
        tmp_path, monkeypatch, digits, train_checkpoint):
    """The table is written row by row: a search killed after its first rows resumes with exactly the
    missing layers measured (a line cut by the kill is dropped), and the finished rows kept as they were."""
    import json
    from dataclasses import asdict

    import autorank.search.table as table_module
    from autorank.compression import SensitivityTable
    from autorank.search.run import run_search
    from autorank.tracking import MlflowCallback

    weights, _ = train_checkpoint("small_cnn", digits, tmp_path, steps=30)
    space = tmp_path / "table.yaml"
    space.write_text(TABLE_SPACE)
    out, log = tmp_path / "search", tmp_path / "search.log"
    rows = out / "sensitivity.rows.jsonl"
    proc = start_cli(["search", "--config", str(space), "--model", "small_cnn", "--weights", str(weights),
                      "--data", "digits", "--out", str(out), "--no-progress"], log)
    try:
        def first_row():
            """a finished row in the table's rows file"""
            return rows.is_file() and len(rows.read_text().splitlines()) >= 2

        wait_for(first_row, 300, proc, log, poll_s=0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert not (out / "sensitivity.json").exists(), "the table finished before the kill: make it slower"
    lines = rows.read_text().splitlines()
    kept = {json.loads(line)["layer"]: json.loads(line)["candidates"] for line in lines[1:]
            if line.endswith("}")}
    assert 1 <= len(kept) < 4
    with rows.open("a") as f:
        f.write('{"layer": "features.10", "seconds": 1.5, "candi')  # a row cut by a kill mid-write

    measured: list[str] = []
    real = table_module.measure_layer

    def counting(job, name, **options):
        measured.append(name)
        return real(job, name, **options)

    monkeypatch.setattr(table_module, "measure_layer", counting)
    run_search(out_dir=out, resume=True, data=digits, progress=False, callbacks=[MlflowCallback()])
    table = SensitivityTable.from_json((out / "sensitivity.json").read_text())
    assert sorted(measured) == sorted(set(table.layers) - set(kept))
    for name, candidates in kept.items():
        assert [asdict(c) for c in table.layers[name]] == candidates
    assert not rows.exists()
    assert_study_and_mlflow_agree(out, 2)
