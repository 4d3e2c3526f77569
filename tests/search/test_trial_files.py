"""A trial writes nothing itself: `compute_trial` hands back its record and the bytes of its
`trials/<n>/` files, and only the driver (`save_trial`) writes them, so a trial on another machine
of a Ray cluster loses nothing. Also the per-trial Ray settings: custom resources and the device."""

from __future__ import annotations

import io
import json

import optuna
import pytest
import torch

from autorank.compression import Plan
from autorank.errors import AutorankError
from autorank.models import create_model
from autorank.records import WEIGHTS_FILE
from autorank.search.executors import custom_resources, parse_resources, trial_device
from autorank.search.space import load_space
from autorank.search.trial import (ERROR_FILE, TrialContext, compute_trial, layer_table, reference_metrics,
                                   save_trial)


@pytest.fixture(scope="module")
def context(tmp_path_factory, tiny_space, pretrained_digits, digits) -> TrialContext:
    """A search's trial context whose output folder does not exist: any write by a trial would create it."""
    space = load_space(tiny_space)
    model = create_model("small_cnn", digits, pretrained_digits).eval()
    layers = layer_table(model, space)
    groups = space.groups({name: info.kind for name, info in layers.items()})
    ctx = TrialContext(space=space, groups=groups, layers=layers, model=model, reference={},
                       out_dir=tmp_path_factory.mktemp("driver") / "never-written", device="cpu")
    ctx.reference = reference_metrics(ctx, digits)
    return ctx


def test_a_trial_writes_nothing_and_the_driver_writes_its_files(tmp_path, context, digits):
    sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = context.space.suggest(sampled, context.groups)
    output = compute_trial(context, digits, params, 3)
    assert not context.out_dir.exists(), "the trial wrote into the search folder itself"
    assert output.record.state == "complete", output.record.reason
    assert set(output.files) == {WEIGHTS_FILE, "plan.json", "metrics.json"}

    record = save_trial(tmp_path, output)
    folder = tmp_path / "trials" / "3"
    assert record.directory == folder and record.weights == folder / WEIGHTS_FILE
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert state.keys() == torch.load(io.BytesIO(output.files[WEIGHTS_FILE]), weights_only=True).keys()
    assert json.loads((folder / "plan.json").read_text()) == record.plan
    assert Plan.from_json((folder / "plan.json").read_text()).layers
    assert json.loads((folder / "metrics.json").read_text())["metrics"] == record.metrics


def test_a_failed_trial_sends_its_traceback_and_saving_replaces_an_earlier_attempt(tmp_path, context, digits):
    params = {"no.such.choice": 1}
    output = compute_trial(context, digits, params, 5)
    assert not context.out_dir.exists()
    assert output.record.state == "failed" and output.record.reason and "\n" not in output.record.reason
    assert b"Traceback" in output.files[ERROR_FILE] and WEIGHTS_FILE not in output.files

    stale = tmp_path / "trials" / "5"
    stale.mkdir(parents=True)
    (stale / WEIGHTS_FILE).write_bytes(b"an earlier attempt's weights")
    record = save_trial(tmp_path, output)
    assert sorted(p.name for p in stale.iterdir()) == [ERROR_FILE] and not record.has_weights


def test_trial_resources_take_custom_ray_resources():
    resources = parse_resources("cpu=1,trialnode=1,gpu=0.5")
    assert resources == {"cpu": 1.0, "trialnode": 1.0, "gpu": 0.5}
    assert custom_resources(resources) == {"trialnode": 1.0}
    for bad in ("cpu=0", "trialnode=-1", "gpu=half", "=1", "CPU=2", "a b=1"):
        with pytest.raises(AutorankError, match="--trial-resources"):
            parse_resources(bad)


def test_a_ray_trial_runs_on_the_gpu_ray_assigned_or_on_the_cpu():
    assert trial_device("auto", ["3"]) == "cuda"   # Ray set CUDA_VISIBLE_DEVICES=3: it is cuda:0 in the trial
    assert trial_device("auto", []) == "cpu"       # no GPU assigned: never one another trial holds
    assert trial_device("cuda:1", []) == "cuda:1"  # an explicit --device is kept
