"""Data-aware fitting on the real adapted ResNet-20 and a sample of ../shared CIFAR-10, and distillation
on sklearn digits."""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, compress, resolve_plan
from autorank.compression import fit as fit_module
from autorank.compression.methods import decompose_layer
from autorank.compression.fit import fit_chains
from autorank.compression.quantize import quantize_weight, quantize_weights_
from autorank.engine import TrainConfig, distillation_loss, train
from autorank.errors import AutorankError
from autorank.models import create_model

# one layer per method and stage (the first is fed by undecomposed layers only), plus the classifier
PLAN = Plan({"layer1.1.conv1": LayerPlan("tucker2", 0.3, "int8"), "layer2.1.conv2": LayerPlan("cp", 0.3, "int8"),
             "layer3.0.conv1": LayerPlan("tt", 0.3, "fp32"), "linear": LayerPlan("svd", 0.5, "int8")})


@pytest.fixture(scope="module")
def resnet20(cifar, shared) -> nn.Module:
    return create_model("resnet20", cifar, shared / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()


@pytest.fixture(scope="module")
def setup(cifar, resnet20):
    """(resolved plan, weight-space compressed model, 128 seeded calibration images)."""
    plan = resolve_plan(resnet20, PLAN)
    return plan, compress(resnet20, plan, n_iter_max=10), cifar.calibration_images(128, 64, seed=0)


def _outputs(model: nn.Module, name: str, images: list[torch.Tensor]) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        for x in images:
            model(x)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("mode", ["als", "pair", "last"])
def test_fit_never_increases_a_layers_output_error(resnet20, setup, mode):
    plan, weight_space, images = setup
    fitted = copy.deepcopy(weight_space)
    stats = fit_chains(fitted, resnet20, list(plan.layers), images, mode=mode)
    assert set(stats) == set(plan.layers)
    assert all(s.after <= s.before for s in stats.values())
    assert sum(s.after for s in stats.values()) < 0.8 * sum(s.before for s in stats.values())
    # measured independently where the chain's input is the same before and after (first chain)
    target = _outputs(resnet20, "layer1.1.conv1", images)
    err = {k: float((_outputs(m, "layer1.1.conv1", images) - target).norm() / target.norm())
           for k, m in (("before", weight_space), ("after", fitted))}
    assert err["after"] < 0.8 * err["before"]
    assert err["after"] == pytest.approx(stats["layer1.1.conv1"].after, rel=1e-4)


def test_alternating_least_squares_fits_chains_better_than_the_last_two_factors(resnet20, setup):
    plan, weight_space, images = setup
    errors = {mode: fit_chains(copy.deepcopy(weight_space), resnet20, list(plan.layers), images, mode=mode)
              for mode in ("als", "pair")}
    conv_chains = [n for n in plan.layers if n != "linear"]
    assert all(errors["als"][n].after <= errors["pair"][n].after for n in conv_chains)
    assert sum(errors["als"][n].after for n in conv_chains) < 0.97 * sum(errors["pair"][n].after for n in conv_chains)


@pytest.mark.parametrize("method,ranks", [("cp", (5,)), ("tucker2", (3, 4)), ("tt", (3, 5, 4))])
def test_a_chain_composes_to_one_kernel_with_the_layers_window(method, ranks):
    """The moments-based fit rests on this: strides and paddings split over the chain compose exactly."""
    layer = nn.Conv2d(6, 7, 3, stride=2, padding=1, bias=True).double()
    chain = decompose_layer(layer, method, ranks, n_iter_max=5)
    modules = [m for m in chain if isinstance(m, nn.Conv2d)]
    assert fit_module._composable(modules, layer)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        expected = chain(x) - chain[-1].bias[:, None, None]
        composed = torch.nn.functional.conv2d(x, fit_module._composite(modules), stride=2, padding=1)
    torch.testing.assert_close(composed, expected)


def test_the_first_factor_step_reaches_the_least_squares_solution():
    """Ground truth from a dense least-squares problem: one column per entry of A, computed by running
    the chain itself, independent of the moments and the conjugate gradients."""
    torch.manual_seed(1)
    layer = nn.Conv2d(4, 5, 3, padding=1, bias=False).double()
    chain = decompose_layer(layer, "tucker2", (3, 3), n_iter_max=5)
    modules = list(chain)
    x = torch.randn(16, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x) + 0.1 * torch.randn(16, 5, 6, 6, dtype=torch.float64)
        columns = []
        for index in range(3 * 4):
            basis = torch.zeros(3 * 4, dtype=torch.float64)
            basis[index] = 1.0
            modules[0].weight.copy_(basis.reshape(3, 4, 1, 1))
            columns.append(chain(x).flatten())
        exact = torch.linalg.lstsq(torch.stack(columns, 1), y.flatten()[:, None]).solution.reshape(3, 4)
        fit_module._step_first(modules, fit_module._chain_moments(layer, x, y, intercept=False))
    torch.testing.assert_close(modules[0].weight[:, :, 0, 0], exact, rtol=1e-5, atol=1e-7)


def test_fit_is_deterministic_and_rebuilds_from_its_state_dict(resnet20, setup):
    plan, _, images = setup
    first = compress(resnet20, plan, n_iter_max=10, fit=images)
    second = compress(resnet20, plan, n_iter_max=10, fit=images)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))
    rebuilt = compress(resnet20, plan, decompose=False)
    rebuilt.load_state_dict(first.state_dict())  # export rebuilds fitted trials like any other


def test_bad_fit_mode_is_an_error_before_any_compute(resnet20):
    with pytest.raises(AutorankError, match="fit mode"):
        compress(resnet20, PLAN, fit=[], fit_mode="everything")


def _mlp() -> nn.Module:
    """No BatchNorm/dropout, so a teacher copy computes exactly the student's logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_distillation_from_an_identical_teacher_contributes_zero_loss(digits):
    torch.manual_seed(0)
    student = _mlp()
    start = copy.deepcopy(student.state_dict())
    result = train(student, digits, TrainConfig(steps=5, batch_size=32, lr=0.1, weight_decay=0.0, distill=1.0,
                                                device="cpu"), teacher=copy.deepcopy(student))
    assert result.losses[0] == 0.0  # and no gradient beyond rounding, so it stays so
    assert max(abs(v) for v in result.losses) < 1e-6
    assert all(torch.allclose(start[k], v, atol=1e-6) for k, v in student.state_dict().items())
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(logits, logits.flip(0), 4.0)) > 0


def test_distillation_needs_a_teacher_and_a_valid_weight(digits):
    with pytest.raises(AutorankError, match="teacher"):
        train(_mlp(), digits, TrainConfig(steps=1, distill=0.5, device="cpu"))
    with pytest.raises(AutorankError, match="distillation weight"):
        train(_mlp(), digits, TrainConfig(steps=1, distill=1.5, device="cpu"), teacher=_mlp())


def test_a_cp_trial_reusing_cached_factors_builds_the_same_model(digits_cnn, digits):
    plan = resolve_plan(digits_cnn, Plan({"features.7": LayerPlan("cp", 0.3, "int8"),
                                          "features.10": LayerPlan("cp", 0.3, "fp32")}))
    images = digits.calibration_images(128, 64, seed=0)
    cache: dict = {}
    fresh = compress(digits_cnn, plan, n_iter_max=20, fit=images)
    first = compress(digits_cnn, plan, n_iter_max=20, fit=images, factors=cache)
    assert len(cache) == 2
    with patch("autorank.compression.apply.decompose_layer", side_effect=AssertionError("decomposed again")):
        reused = compress(digits_cnn, plan, n_iter_max=20, fit=images, factors=cache)
    for model in (first, reused):
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                     strict=True))


@pytest.mark.parametrize("name,lp", [("layer2.1.conv2", LayerPlan("cp", 0.3, "int8")),
                                     ("layer1.1.conv1", LayerPlan("tucker2", 0.3, "int4")),
                                     ("layer2.0.conv1", LayerPlan("none", None, "int4"))])
def test_a_recorded_layer_fits_its_chain_as_a_pass_through_the_network_does(cifar, resnet20, name, lp):
    """A chain replacing one layer alone sees the original's input to that layer: fitting it from the
    input and output recorded once (the sensitivity table's shortcut) gives the same chain."""
    images = cifar.calibration_images(64, 32, seed=1)
    plan = Plan({name: lp}, "int8")
    calibration = cifar.calibration_images(64, 32, seed=2)
    through = compress(resnet20, plan, fit=images, n_iter_max=10, calibration=calibration)
    recorded = fit_module.RecordedLayer(resnet20, name, images)
    assert len(recorded.inputs) == len(recorded.outputs) == 64
    for _ in range(2):  # the second fit reuses the recorded moments
        again = compress(resnet20, plan, fit=recorded, n_iter_max=10, calibration=calibration)
        for (key, a), (_, b) in zip(through.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), key
    assert set(recorded._moments) == {False}  # no bias (chain or whole layer): one set of moments, computed once


def test_a_recorded_layer_refuses_a_plan_that_changes_another_layer(cifar, resnet20):
    recorded = fit_module.RecordedLayer(resnet20, "layer2.0.conv1", cifar.calibration_images(16, 16, seed=0))
    plan = Plan({"layer1.0.conv1": LayerPlan("none", None, "int8"),
                 "layer2.0.conv1": LayerPlan("tucker2", 0.3, "int8")})
    with patch.object(fit_module, "_fit_chain", side_effect=AssertionError("fitted")):
        with pytest.raises(AutorankError, match="recorded at layer2.0.conv1 holds only .* changes that layer alone"):
            compress(resnet20, plan, fit=recorded, n_iter_max=10)


def _rounding_setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs X (n x F) as a chain's factors produce them, a weight W (T x F), Gram H = X^T X."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    x = torch.randn(2000, 24, generator=gen, dtype=torch.float64) @ mix
    w = torch.randn(10, 24, generator=gen, dtype=torch.float64)
    return x, w, x.T @ x


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_error_compensated_rounding_beats_rounding_to_nearest_on_the_quantizers_grid(precision):
    x, w, h = _rounding_setup()
    module = quantize_weights_(nn.Linear(24, 10, bias=False).double(), precision)
    rounded = fit_module._rounded(module, w, h)
    # the fake quantizer recomputes exactly this weight (per-channel scale unchanged, values on its grid)
    assert torch.allclose(quantize_weight(rounded, precision), rounded, rtol=0, atol=1e-12)
    nearest = quantize_weight(w, precision)
    assert ((w - rounded) @ x.T).norm() < 0.8 * ((w - nearest) @ x.T).norm()
    # a float layer keeps its least-squares weight
    assert torch.equal(fit_module._rounded(nn.Linear(24, 10, bias=False).double(), w, h), w)


def test_error_compensated_rounding_is_rounding_to_nearest_for_uncorrelated_inputs():
    """A diagonal Gram matrix leaves no other column to carry a column's error: GPTQ reduces to rounding."""
    _, w, _ = _rounding_setup()
    module = quantize_weights_(nn.Linear(24, 10, bias=False).double(), "int4")
    h = torch.diag(torch.linspace(1.0, 3.0, 24, dtype=torch.float64))
    assert torch.allclose(fit_module._rounded(module, w, h), quantize_weight(w, "int4"), rtol=0, atol=1e-12)


def test_int4_cp_at_a_high_rank_keeps_its_fit_through_the_rounding(cifar, resnet20):
    """CP at rank 136 on layer3.0.conv1 (64 x 32 x 3 x 3), int4: rounding its last 1x1 (136 inputs) to
    nearest undid most of the fit (relative output error 0.23 against 0.04 unrounded); compensated, it
    stays close to the int8 chain's error."""
    recorded = fit_module.RecordedLayer(resnet20, "layer3.0.conv1", cifar.calibration_images(128, 64, seed=0))

    def error(precision: str) -> float:
        model = compress(resnet20, Plan({"layer3.0.conv1": LayerPlan("cp", [136], precision)}), fit=recorded,
                         n_iter_max=10)
        chain = list(model.get_submodule("layer3.0.conv1"))
        return fit_module._rel_error(chain, recorded.inputs, recorded.outputs, 64)

    compensated = error("int4")
    with patch.object(fit_module, "_rounded", lambda module, weight, cov: weight):
        nearest = error("int4")
    assert compensated < 0.5 * nearest
    assert compensated < 2.5 * error("int8")


def test_a_layer_kept_whole_at_int4_is_rounded_on_the_fit_images(cifar, resnet20):
    """Its weights stay the pretrained ones, rounded with their errors compensated: the layer's output error
    on the fit images falls (layer2.0.conv1, 128 images: 0.107 rounded to nearest, 0.036 compensated)."""
    name, images = "layer2.0.conv1", cifar.calibration_images(128, 64, seed=0)
    plan = Plan({name: LayerPlan("none", None, "int4")})
    target = _outputs(resnet20, name, images)

    def error(model: nn.Module) -> float:
        return float((_outputs(model, name, images) - target).norm() / target.norm())

    rounded, nearest = compress(resnet20, plan, fit=images), compress(resnet20, plan)
    assert error(rounded) < 0.5 * error(nearest)
    weight = rounded.get_submodule(name).weight.detach()
    assert torch.allclose(quantize_weight(weight, "int4"), weight, rtol=0, atol=1e-6)
    # per output channel the same scale as rounding to nearest: the largest weight keeps its level
    assert torch.allclose(weight.abs().amax((1, 2, 3)), nearest.get_submodule(name).weight.detach().abs().amax((1, 2, 3)))
