"""Exact size and compute accounting of a (compressed) model.

- params: every parameter once.
- size_bytes: what the deployed weights take at each layer's precision — fp32 4 bytes, fp16 2 bytes,
  int8 1 byte, int4 half a byte (rounded up per tensor) per weight, plus one fp32 scale per output
  channel for int8/int4 weights. Biases stay 4 bytes (int32 / fp32 in QDQ inference) except in fp16
  layers (2 bytes); other parameters (BatchNorm affine) 4 bytes; each activation quantizer stores a
  fp32 scale and an int8 zero point (5 bytes). Buffers such as BatchNorm running statistics are not
  counted: inference folds them into the preceding conv.
- macs: multiply-accumulates of every Conv2d and Linear for one input of `input_shape`, measured with
  forward hooks (other layers count 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .quantize import INT_BITS, ActivationFakeQuant, weight_precision

ACTIVATION_QPARAM_BYTES = 5  # fp32 scale + int8 zero point


@dataclass
class LayerProfile:
    name: str
    kind: str
    precision: str
    params: int
    size_bytes: int
    macs: int


@dataclass
class Profile:
    params: int
    size_bytes: int
    macs: int
    layers: dict[str, LayerProfile] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"params": self.params, "size_bytes": self.size_bytes, "macs": self.macs,
                "layers": {n: asdict(lp) for n, lp in self.layers.items()}}


def tensor_bytes(numel: int, out_channels: int, precision: str) -> int:
    """Storage of a weight tensor at `precision`, including per-output-channel scales for integers."""
    if precision in INT_BITS:
        return math.ceil(numel * INT_BITS[precision] / 8) + 4 * out_channels
    return numel * (2 if precision == "fp16" else 4)


def _owned_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters by role ("weight", "bias", ...), looking through parametrizations."""
    own = dict(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        for role, plist in module.parametrizations.items():
            own[role] = plist.original
    return own


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * kh * kw
    return per_sample * module.in_features


def profile(model: nn.Module, input_shape: tuple[int, ...]) -> Profile:
    """Per-layer and total params, size_bytes and MACs for one input of shape `input_shape` (C, H, W)."""
    macs: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, _inp, out, name=name: macs.__setitem__(name, _macs(mod, out)))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    quantizers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    saved = [{k: v.clone() for k, v in q.state_dict().items()} for q in quantizers]
    first = next(model.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else ("cpu", torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for q, state in zip(quantizers, saved, strict=True):
            q.load_state_dict(state)

    layers: dict[str, LayerProfile] = {}
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its `original` is accounted to the parametrized layer
        own = _owned_parameters(module)
        is_quantizer = isinstance(module, ActivationFakeQuant)
        if not own and name not in macs and not is_quantizer:
            continue
        precision = weight_precision(module)
        size = ACTIVATION_QPARAM_BYTES if is_quantizer else 0
        for role, tensor in own.items():
            if role == "weight" and isinstance(module, nn.Conv2d | nn.Linear):
                size += tensor_bytes(tensor.numel(), tensor.shape[0], precision)
            else:
                size += tensor.numel() * (2 if precision == "fp16" else 4)
        layers[name] = LayerProfile(name, type(module).__name__, precision,
                                    sum(t.numel() for t in own.values()), size, macs.get(name, 0))
    return Profile(sum(lp.params for lp in layers.values()), sum(lp.size_bytes for lp in layers.values()),
                   sum(lp.macs for lp in layers.values()), layers)
