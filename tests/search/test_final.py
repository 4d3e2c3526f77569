"""The final fine-tune restarted from each finalist's fitted start at its own LR (`final: {start: fitted,
lr}`, autorank.search.final), and the uncompressed reference given the same budget."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

from autorank import engine
from autorank.compression import Plan
from autorank.models import create_model
from autorank.records import WEIGHTS_FILE, pareto_front
from autorank.search import load_search
from autorank.search.run import run_search
from autorank.search.space import space_from_dict
from autorank.search.trial import TrialContext, compress_trial

FINAL_STEPS, FINAL_LR = 10, 0.02

FITTED_SPACE = {
    "name": "tinyfinal",
    "mode": "allocate",
    "methods": ["none", "tucker2", "svd"],
    "precisions": ["fp32", "int8", "int4"],
    "sensitivity": {"images": 120, "levels": [2], "fit_images": 32},
    "allocate": {"ratio": [2.0, 8.0]},
    "finetune": {"steps": 8, "lr": 0.05, "batch_size": 64, "decompose_iters": 5, "fit_images": 64},
    "final": {"top": 2, "steps": FINAL_STEPS, "lr": FINAL_LR, "start": "fitted"},
    "search": {"trials": 3, "population": 4, "seed": 0, "seed_ratios": [0.5]},
}


@pytest.fixture(scope="module")
def fitted_final(tmp_path_factory, pretrained_digits, digits):
    folder = tmp_path_factory.mktemp("final")
    space = folder / "final.yaml"
    space.write_text(yaml.safe_dump(FITTED_SPACE))
    run_search(space, "small_cnn", pretrained_digits, "digits", folder / "search", data=digits, progress=False)
    return load_search(folder / "search")


def test_a_fitted_final_restarts_from_the_plans_fitted_start_at_its_own_lr(fitted_final, pretrained_digits, digits):
    """Each finalist's final weights are its plan compressed again (the trial's data-aware fit) and then
    fine-tuned `final.steps` at `final.lr` without the guard, not a continuation of the trial's weights."""
    search = fitted_final
    space = space_from_dict(search.info["space"])
    assert (space.final.start, space.final.lr) == ("fitted", FINAL_LR)
    pretrained = create_model("small_cnn", digits, pretrained_digits).eval()
    ctx = TrialContext(space=space, groups=[], layers={}, model=pretrained, reference={}, out_dir=search.out_dir,
                       device="cpu")
    config = dataclasses.replace(ctx.train_config(), steps=FINAL_STEPS, lr=FINAL_LR, guard=0)
    finalized = [t for t in search.trials if t.finalized]
    assert 1 <= len(finalized) <= 2
    for t in finalized:
        model = compress_trial(ctx, digits, Plan.from_json((t.directory / "plan.json").read_text()))
        engine.train(model, digits, config, teacher=pretrained)
        final = torch.load(t.directory / "final.pt", weights_only=True)
        expected = model.state_dict()
        assert final.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5)
        assert t.figures["accuracy"] == pytest.approx(engine.evaluate(model, digits, "val"))
        assert t.figures["steps"] == FINAL_STEPS and "kept_start" not in t.figures
    # the reference gets the finalists' budget: the final steps from the pretrained weights, no trial steps
    reference = copy.deepcopy(pretrained)
    engine.train(reference, digits, config, teacher=pretrained)
    assert search.final_reference["accuracy"] == pytest.approx(engine.evaluate(reference, digits, "val"))


def test_every_front_member_keeps_its_weights_after_the_final(fitted_final):
    """A final fine-tune may end a finalist lower and so bring back a trial it dominated before: the
    search prunes weights only after the final, on the figures `best` and export go by."""
    search = fitted_final
    front = pareto_front(search.trials, space_from_dict(search.info["space"]).objectives, feasible_only=False)
    for t in front:
        assert (t.directory / WEIGHTS_FILE).is_file(), t.number
    kept = {t.number for t in search.trials if (t.directory / WEIGHTS_FILE).is_file()}
    assert kept == {t.number for t in front}  # and the others are pruned
