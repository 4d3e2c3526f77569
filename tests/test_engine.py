"""Engine: learning from scratch, determinism, divergence, settings, devices, evaluate/measure."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from autorank.engine import TrainConfig, evaluate, measure, resolve_device, train
from autorank.errors import AutorankError, TrialDiverged
from autorank.models import create_model


def test_small_cnn_learns_digits_from_scratch(digits):
    model = create_model("small_cnn", digits)
    assert evaluate(model, digits, "val") < 0.3
    result = train(model, digits, TrainConfig(epochs=8, batch_size=64, lr=0.05))
    assert result.steps == 8 * (1258 // 64) and math.isfinite(result.final_loss)
    assert evaluate(model, digits, "val") >= 0.95
    assert result.losses[-1] < result.losses[0] / 10


def test_training_is_deterministic_for_a_seed(digits):
    def run(seed):
        torch.manual_seed(0)
        model = create_model("small_cnn", digits)
        return train(model, digits, TrainConfig(steps=15, batch_size=32, seed=seed)).losses

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize(
    "settings",
    [
        dict(optimizer="adamw", lr=3e-3, schedule="onecycle"),
        dict(schedule="constant", lr=0.05, channels_last=True),
        dict(lr=0.05, bf16=True),
        dict(lr=0.05, amp=True),  # bf16 autocast off CUDA
    ],
)
def test_optimizers_schedules_and_precisions_reduce_the_loss(digits, settings):
    model = create_model("small_cnn", digits)
    result = train(model, digits, TrainConfig(steps=60, batch_size=64, **settings))
    assert all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-10:]) / 10 < result.losses[0] / 2


def test_cosine_schedule_decays_to_zero(digits):
    model = create_model("small_cnn", digits)
    lrs = []
    original_step = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", record)
        train(model, digits, TrainConfig(steps=20, lr=0.1))
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.05) and lrs[-1] < 0.002


def test_a_nan_loss_raises_trial_diverged(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(TrialDiverged, match="non-finite loss"):
        train(model, digits, TrainConfig(steps=50, lr=1e38, momentum=0.0, weight_decay=0.0))


def test_the_guard_restores_a_start_that_the_fine_tune_made_worse(digits):
    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    train(model, digits, TrainConfig(epochs=2, batch_size=64, lr=0.05))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    good = evaluate(model, digits, "val")
    # a constant LR far too high for a trained model: finite losses, but the weights are wrecked
    harmful = TrainConfig(steps=5, batch_size=64, lr=2.0, schedule="constant", guard=200)
    wrecked = copy.deepcopy(model)
    unguarded = train(wrecked, digits, replace(harmful, guard=0))
    assert evaluate(wrecked, digits, "val") < good - 0.1 and unguarded.guard is None and not unguarded.kept_start

    result = train(model, digits, harmful)
    assert result.kept_start and result.guard[1] < result.guard[0]
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert evaluate(model, digits, "val") == good


def test_the_guard_keeps_a_fine_tune_that_helped(digits):
    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    # channels_last: the guard's first evaluation converts the parameters, which must stay trainable
    result = train(model, digits, TrainConfig(epochs=2, batch_size=64, lr=0.05, guard=200, channels_last=True))
    assert not result.kept_start and result.guard[1] > result.guard[0] + 0.3
    assert evaluate(model, digits, "val", limit=200) == result.guard[1]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(), "exactly one of steps or epochs"),
        (dict(steps=5, epochs=1.0), "exactly one of steps or epochs"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(epochs=-1.0), "epochs must be > 0"),
        (dict(steps=5, optimizer="lbfgs"), "unknown optimizer"),
        (dict(steps=5, schedule="step"), "unknown schedule"),
        (dict(steps=5, lr=0.0), "learning rate"),
        (dict(steps=5, device="tpu"), "unknown device"),
        (dict(steps=5, guard=-1), "guard images"),
    ],
)
def test_bad_settings_are_rejected_before_training(digits, settings, message):
    model = create_model("small_cnn", digits)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(AutorankError, match=message):
        train(model, digits, TrainConfig(**settings))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(AutorankError, match="CUDA is not available"):
            resolve_device("cuda")


def test_evaluate_restores_the_training_mode_and_respects_limit(cifar, shared):
    model = create_model("resnet20", cifar, shared / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt")
    model.train()
    accuracy = evaluate(model, cifar, "val", limit=1000)
    assert model.training
    assert 0.88 <= accuracy <= 0.97  # 0.928 on the full val split (ADAPTED.md)
    # limit = the seeded stratified sample (the class-ordered first 1000 would be two classes)
    assert accuracy == evaluate(model, cifar.sample("val", 1000, seed=0), "val")
    assert evaluate(model, cifar, "val", limit=1000, seed=1) == evaluate(model, cifar.sample("val", 1000, seed=1), "val")
    assert evaluate(model, cifar, "val", limit=1000, channels_last=True) == pytest.approx(accuracy, abs=1e-3)
    with pytest.raises(AutorankError, match="unknown split"):
        evaluate(model, cifar, "holdout")


def test_fine_tuning_on_augmented_cifar_batches_improves_the_public_checkpoint(cifar, shared):
    """The public checkpoint loses ~10 points on the JPEG images; a few hundred images of fitting help."""
    model = create_model("resnet20", cifar, shared / "models" / "cifar10" / "resnet20-12fca82f.th")
    before = evaluate(model, cifar, "test", limit=1000)
    train(model, cifar, TrainConfig(steps=25, batch_size=64, lr=0.01, channels_last=True))
    after = evaluate(model, cifar, "test", limit=1000)
    assert after > before + 0.01


def test_measure_reports_size_macs_and_latency(cifar, shared):
    model = create_model("resnet20", cifar, shared / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt")
    metrics = measure(model, cifar, "test", limit=500)
    assert set(metrics) == {"accuracy", "params", "size_bytes", "macs", "latency_ms"}
    assert metrics["params"] == 269_722
    assert metrics["size_bytes"] >= 4 * 269_722  # fp32 weights
    assert 40e6 < metrics["macs"] < 42e6  # ResNet-20 at 32x32: ~41M multiply-accumulates
    assert 0 < metrics["latency_ms"] < 1000
