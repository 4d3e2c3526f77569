"""Model zoo: shapes for every name and input size, the shared checkpoints, clear mismatch errors."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from autorank.errors import AutorankError
from autorank.models import MODEL_NAMES, create_model, load_weights
from autorank.models.checkpoints import resolve_source
from autorank.models.cifar_resnet import PadShortcut

CIFAR_LIKE = types.SimpleNamespace(input_shape=(3, 32, 32), num_classes=10)
IMAGENET_LIKE = types.SimpleNamespace(input_shape=(3, 224, 224), num_classes=1000)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_fits_cifar_and_8x8_grayscale(name, digits):
    for data in (CIFAR_LIKE, digits):
        model = create_model(name, data).eval()
        with torch.no_grad():
            out = model(torch.randn(1, *data.input_shape))
        assert out.shape == (1, data.num_classes)


@pytest.mark.parametrize(
    "name, params", [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018)]
)
def test_cifar_resnet_parameter_counts_match_the_paper(name, params):
    assert sum(p.numel() for p in create_model(name, CIFAR_LIKE).parameters()) == params


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_small_inputs_get_a_3x3_stem_and_large_keep_imagenet_stem():
    small, large = create_model("resnet18", CIFAR_LIKE), create_model("resnet18", IMAGENET_LIKE)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize(
    "name, file",
    [("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763-jpeg-adapted.pt")],
)
def test_shared_checkpoints_load_as_they_are(name, file, shared):
    path = shared / "models" / "cifar10" / file
    model = create_model(name, CIFAR_LIKE, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in raw.items():
        assert torch.equal(model.state_dict()[key.removeprefix("module.")], value)


def test_mismatched_checkpoint_names_offending_keys_on_one_line(shared, tmp_path):
    path = shared / "models" / "cifar10" / "resnet56-4bfd9763.th"
    with pytest.raises(AutorankError) as err:
        create_model("resnet32", CIFAR_LIKE, path)
    message = str(err.value)
    assert "\n" not in message and "unexpected 120: layer1.5.conv1.weight" in message and "more)" in message
    with pytest.raises(AutorankError, match=r"shape mismatch 1: conv1.weight \(16, 3, 3, 3\)!=\(16, 1, 3, 3\)"):
        create_model("resnet56", types.SimpleNamespace(input_shape=(1, 32, 32), num_classes=10), path)
    model = create_model("resnet20", CIFAR_LIKE)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("linear.")}, tmp_path / "headless.pt")
    with pytest.raises(AutorankError, match="missing 2: linear.weight, linear.bias"):
        load_weights(model, tmp_path / "headless.pt")


def test_unknown_model_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(AutorankError, match="unknown model 'resnet21'"):
        create_model("resnet21", CIFAR_LIKE)
    with pytest.raises(AutorankError, match="weights file not found"):
        create_model("resnet20", CIFAR_LIKE, tmp_path / "missing.th")
    junk = tmp_path / "junk.th"
    junk.write_text("not a checkpoint")
    with pytest.raises(AutorankError, match="cannot load weights"):
        create_model("resnet20", CIFAR_LIKE, junk)


def test_a_model_name_as_weights_downloads_its_public_checkpoint(shared, monkeypatch):
    url = resolve_source("resnet20")
    assert url == "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th"
    requested = []

    def fake_download(address, **kwargs):  # stands in for the network: same bytes as the public file
        requested.append((address, kwargs["weights_only"]))
        return torch.load(shared / "models" / "cifar10" / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = create_model("resnet20", CIFAR_LIKE, "resnet20")
    assert requested == [(url, True)]
    assert model.linear.weight.abs().sum() > 0

    def offline(address, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(AutorankError, match="cannot download weights https://github.com/akamaster"):
        create_model("resnet56", CIFAR_LIKE, "resnet56")


def test_user_factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes, input_shape):\n"
        "    c, h, w = input_shape\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))\n"
        "NOT_A_FACTORY = 3\n"
        "def wrong(num_classes): return nn.Linear(num_classes)\n"
        "def classes_only(num_classes): return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def anything(**options): return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, options['num_classes']))\n"
        "class Net(nn.Linear):\n"
        "    def __init__(self, num_classes, *, bias=True): super().__init__(3 * 32 * 32, num_classes, bias)\n"
        "def needs_depth(num_classes, depth): return nn.Linear(1, num_classes)\n"
        "def positional(num_classes, /): return nn.Linear(1, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("module:my_nets:tiny", CIFAR_LIKE)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # each factory gets only the keyword arguments its signature takes (the common one: num_classes alone)
    for name in ("classes_only", "anything"):
        assert create_model(f"module:my_nets:{name}", CIFAR_LIKE)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert create_model("module:my_nets:Net", CIFAR_LIKE).out_features == 10
    for spec, message in [
        ("module:my_nets:missing", "cannot import"),
        ("module:no_such_pkg:tiny", "cannot import"),
        ("module:my_nets:NOT_A_FACTORY", "not callable"),
        ("module:my_nets:wrong", r"my_nets:wrong\(num_classes=...\) failed"),
        ("module:my_nets:needs_depth", "requires depth: autorank passes only num_classes, input_shape"),
        ("module:my_nets:positional", "requires num_classes: autorank passes only"),
        ("module:my_nets", "expected module:pkg.mod:factory"),
    ]:
        with pytest.raises(AutorankError, match=message):
            create_model(spec, CIFAR_LIKE)
