"""On the real adapted ResNet-20 (../shared): accuracy at EVBMF ranks, state_dict round trips, and the
research's CP + INT8 finding (stabilised CP quantizes, unstabilised CP does not)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan, calibrate, compress, make_plan, profile, resolve_plan
from autorank.compression.methods import decompose_layer
from autorank.compression.quantize import ActivationFakeQuant
from autorank.compression.quantize import quantize_weights_
from autorank.compression.ranks import ratio_ranks
from autorank.data.dataset import Dataset
from autorank.engine import evaluate
from autorank.errors import AutorankError
from autorank.models import create_model
from tests.conftest import CIFAR_MODELS

WEIGHTS = CIFAR_MODELS / "resnet20-12fca82f-jpeg-adapted.pt"
EVAL_IMAGES = 2000
# Documented in docs/COMPRESSION.md: without fine-tuning, Tucker-2 at EVBMF ranks weakened with
# w = 0.2 loses at most this much top-1 accuracy on ResNet-20; plain EVBMF ranks (w = 1) are a
# starting point for fine-tuning, not a no-retraining setting.
MARGIN_W02 = 0.10


@pytest.fixture(scope="module")
def resnet20(cifar) -> nn.Module:
    return create_model("resnet20", cifar, WEIGHTS).eval()


@pytest.fixture(scope="module")
def test_slice(cifar) -> Dataset:
    """A seeded random slice of the test split (all classes, unlike its first N images)."""
    images, labels = cifar.split("test")
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:EVAL_IMAGES]
    return Dataset("cifar10-slice", cifar.classes, {"test": (images[index], labels[index])},
                   cifar.mean, cifar.std, augment=False)


@pytest.fixture(scope="module")
def images(cifar) -> torch.Tensor:
    return next(cifar.batches("val", 64, shuffle=True, generator=torch.Generator().manual_seed(1)))[0]


def test_tucker2_at_evbmf_ranks_accuracy(resnet20, test_slice):
    reference = evaluate(resnet20, test_slice, "test", device="cpu")
    weakened = compress(resnet20, make_plan(resnet20, "tucker2", "vbmf:0.2"))
    accuracy = evaluate(weakened, test_slice, "test", device="cpu")
    print(f"ResNet-20 top-1 on {EVAL_IMAGES} test images: original {reference:.4f}, "
          f"Tucker-2 at EVBMF ranks w=0.2 {accuracy:.4f}")
    assert reference > 0.85
    assert accuracy >= reference - MARGIN_W02
    assert profile(weakened, (3, 32, 32)).params < profile(resnet20, (3, 32, 32)).params
    # plain EVBMF ranks: the aggressive seed the search starts from (about 10% of the parameters)
    plain = resolve_plan(resnet20, make_plan(resnet20, "tucker2", "vbmf"))
    full = {n: resnet20.get_submodule(n).weight.numel() for n in plain.layers}
    kept = profile(compress(resnet20, plain, decompose=False), (3, 32, 32)).params
    assert kept < 0.15 * profile(resnet20, (3, 32, 32)).params
    assert all(lp.method == "tucker2" for n, lp in plain.layers.items() if full[n] > 2000)


def test_state_dict_round_trip_of_a_mixed_int8_model(resnet20, images):
    plan = Plan({
        "layer1.0.conv1": LayerPlan("cp", 0.5, "int8"),
        "layer1.0.conv2": LayerPlan("cp", 0.3, "int8", stabilize="none"),
        **{f"layer2.{b}.conv{c}": LayerPlan("tt", "vbmf", "int8") for b in range(3) for c in (1, 2)},
        **{f"layer3.{b}.conv{c}": LayerPlan("tucker2", "vbmf:0.5", "int4") for b in range(3) for c in (1, 2)},
        "linear": LayerPlan("svd", 6, "fp16"),
    }, activations="int8")
    before = copy.deepcopy(resnet20.state_dict())
    compressed = compress(resnet20, plan, calibration=[images], n_iter_max=20)
    assert all(torch.equal(v, resnet20.state_dict()[k]) for k, v in before.items())  # original untouched
    assert isinstance(compressed.layer1[0].conv1, nn.Sequential)
    compressed.train()  # a fine-tuning step changes weights and observer ranges
    opt = torch.optim.SGD(compressed.parameters(), lr=0.01)
    compressed(images).logsumexp(1).mean().backward()
    opt.step()
    compressed.eval()
    saved = {k: v.clone() for k, v in compressed.state_dict().items()}

    resolved = resolve_plan(resnet20, Plan.from_json(plan.to_json()))
    rebuilt = compress(resnet20, Plan.from_json(resolved.to_json()), decompose=False)
    rebuilt.load_state_dict(saved)
    rebuilt.eval()
    with torch.no_grad():
        out = compressed(images)
        assert torch.equal(rebuilt(images), out)
        assert torch.isfinite(out).all()


def _layer_inputs(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach())) for n in names]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return inputs


def _static_int8(chain: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """int8 per-channel weights and calibrated int8 activations at every conv input of the chain."""
    quantized = copy.deepcopy(chain)
    for conv in quantized:
        quantize_weights_(conv, "int8")
    quantized = nn.Sequential(*[m for conv in quantized for m in (ActivationFakeQuant(), conv)])
    return calibrate(quantized, [x]).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_breaks_unstabilised_cp_but_not_stabilised(resnet20, images):
    names = ["layer2.1.conv1", "layer2.2.conv2"]
    inputs = _layer_inputs(resnet20, names, images)
    ratios = []
    for name in names:
        conv, x = resnet20.get_submodule(name), inputs[name]
        rank = ratio_ranks("cp", tuple(conv.weight.shape), 0.6)[0]
        errors = {}
        with torch.no_grad():
            for stabilize in ("none", "epc"):
                chain = decompose_layer(conv, "cp", (rank,), stabilize=stabilize, n_iter_max=40).eval()
                float_out = chain(x)
                quant_out = _static_int8(chain, x)(x)
                errors[stabilize] = (_rel(quant_out, float_out), _rel(quant_out, conv(x)), _rel(float_out, conv(x)))
        ratio = errors["none"][0] / errors["epc"][0]
        ratios.append(ratio)
        print(f"{name} CP rank {rank}: int8 error vs float CP  unstabilised {errors['none'][0]:.4f}  "
              f"EPC {errors['epc'][0]:.4f}  (x{ratio:.1f});  vs original layer {errors['none'][1]:.4f} / "
              f"{errors['epc'][1]:.4f};  float CP error {errors['none'][2]:.4f} / {errors['epc'][2]:.4f}")
        assert errors["epc"][1] < errors["none"][1]
    assert min(ratios) >= 3.0


def test_bad_plans_fail_before_any_compute(resnet20, monkeypatch):
    import autorank.compression.vbmf as vbmf

    def no_compute(*_args, **_kwargs):
        raise AssertionError("EVBMF ran before the plan was validated")

    monkeypatch.setattr(vbmf, "evbmf", no_compute)
    good = {"layer1.0.conv1": LayerPlan("cp", "vbmf")}
    cases = {
        "unknown layer": {"layer9.conv": LayerPlan("tucker2", 4)},
        "not a candidate": {"bn1": LayerPlan("tucker2", 4)},
        "not applicable": {"linear": LayerPlan("cp", 4)},
        "out of range": {"layer1.0.conv2": LayerPlan("tucker2", [17, 4])},
        "bad spec": {"layer1.0.conv2": LayerPlan("tt", "half")},
    }
    for problem, layers in cases.items():
        with pytest.raises(AutorankError) as info:
            compress(resnet20, Plan({**good, **layers}))
        assert "\n" not in str(info.value), problem
    with pytest.raises(AutorankError):
        LayerPlan("cp", 4, "int2")
    with pytest.raises(AutorankError):
        Plan.from_json('{"layers": {"conv1": {"method": "cp", "ranks": 4}}}')
