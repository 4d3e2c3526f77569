"""A trial that raises, and a trial whose loss becomes NaN: recorded failed with the reason, and
the search goes on to its requested number of trials."""

from __future__ import annotations

from tests.reliability.fixtures import RAISE_MESSAGE
from tests.reliability.searches import POISONED, assert_study_and_mlflow_agree, write_space


def test_raising_and_nan_trials_are_recorded_failed_and_the_search_goes_on(tmp_path):
    from autorank.search import run_search
    from autorank.tracking import MlflowCallback

    space = tmp_path / "poison.yaml"
    # retention ratios that always shrink a layer, so a sampled decomposition is never resolved away
    space.write_text(write_space(tmp_path, trials=8).read_text().replace(
        "precisions: [fp32, int8]", "precisions: [fp32]\nrank:\n  mode: ratio\n  ratio: [0.1, 0.3]"))
    tracker = MlflowCallback()
    result = run_search(space, POISONED, None, "digits", tmp_path / "search", progress=False, callbacks=[tracker])
    assert tracker.unlogged == []
    trials = assert_study_and_mlflow_agree(tmp_path / "search", 8)

    for trial in trials:
        # the trial's resolved plan (its summary): a sampled svd/tucker2 that would not shrink the
        # layer is left undecomposed (compression.resolve_plan) and poisons nothing
        raised = "svd" in trial.summary  # the only linear layer is fixtures.RAISE_LAYER
        diverged = "tucker2" in trial.summary and not raised  # the only searched conv is fixtures.NAN_LAYER
        if raised:
            assert trial.state == "failed" and trial.reason == f"RuntimeError: {RAISE_MESSAGE}"
        elif diverged:
            assert trial.state == "failed" and trial.reason.startswith("TrialDiverged:")
            assert "non-finite" in trial.reason
        else:
            assert trial.state == "complete" and 0 <= trial.metrics["accuracy"] <= 1
        if trial.state == "failed":  # the traceback is kept, no weights are
            assert (trial.directory / "error.txt").is_file() and not trial.has_weights
    states = {t.state for t in trials}
    reasons = {(t.reason or "").split(":")[0] for t in trials}
    assert states == {"complete", "failed"} and {"RuntimeError", "TrialDiverged"} <= reasons
    assert result.best is not None and result.best.state == "complete"
