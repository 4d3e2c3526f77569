"""Fake quantization with straight-through gradients, kept export-friendly.

Weights: a parametrization on `weight` (the module stays a plain nn.Conv2d / nn.Linear) rounds to
fp16, or to per-output-channel symmetric int8 ([-64, 64]) / int4 ([-7, 7]) with scale
max|w| / qmax per channel. int8 weights use 7 of their 8 bits so that the file computes exactly this
on every CPU: x86 without VNNI (AVX2, AVX-512 before Cascade Lake) multiplies uint8 activations by
int8 weights with VPMADDUBSW, which adds pairs of products into int16 and saturates at 32,767; with
|w| <= 64 a pair is at most 2 x 255 x 64 = 32,640 (docs/EXPORT.md, "int8 on every CPU"). Activations: `ActivationFakeQuant`, per-tensor asymmetric int8 with a
range from calibration (min/max or percentile observers) or, if never calibrated, from the first
batch, then an exponential moving average while training.

`strip_fake_quant` bakes the rounded weights into plain float tensors and drops the activation
quantizers, which is what ONNX export and ONNX Runtime's own static QDQ re-quantization need: the
baked int8 weights lie on the same per-channel grid that ONNX Runtime recomputes from them.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autorank.errors import AutorankError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
INT_BITS = {"int8": 8, "int4": 4}
# symmetric grid [-qmax, qmax]; int8 stored in 8 bits but on 7-bit levels (saturation-free, see above)
QMAX = {"int8": 64, "int4": 7}
OBSERVERS = ("minmax", "percentile")


def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """Forward `rounded`, backward identity."""
    return x + (rounded - x).detach()


def quantize_weight(weight: Tensor, precision: str) -> Tensor:
    """The weight as it will be stored: fp16-rounded or on the per-output-channel integer grid."""
    if precision == "fp32":
        return weight
    if precision == "fp16":
        return weight.to(torch.float16).to(weight.dtype)
    qmax = QMAX[precision]
    absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return torch.clamp(torch.round(weight / scale), -qmax, qmax) * scale


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight seen by forward is quantized; gradients pass straight through."""

    def __init__(self, precision: str):
        super().__init__()
        if precision not in PRECISIONS or precision == "fp32":
            raise AutorankError(f"weight precision {precision!r}: choose from fp16, int8, int4")
        self.precision = precision

    def forward(self, weight: Tensor) -> Tensor:
        return _straight_through(weight, quantize_weight(weight, self.precision))

    def extra_repr(self) -> str:
        return self.precision


def quantize_weights_(module: nn.Module, precision: str) -> nn.Module:
    """Attach weight fake-quant to one Conv2d/Linear in place (fp32: nothing to do)."""
    if precision not in PRECISIONS:
        raise AutorankError(f"weight precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision != "fp32":
        parametrize.register_parametrization(module, "weight", WeightFakeQuant(precision))
    return module


def weight_precision(module: nn.Module) -> str:
    """The storage precision of a module's weight: the fake-quant precision, else fp32."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightFakeQuant):
                return p.precision
    return "fp32"


def layer_precisions(model: nn.Module) -> dict[str, str]:
    """Weight precision of every Conv2d/Linear by module name (what export keeps fp32/fp16/int)."""
    return {name: weight_precision(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric int8 fake quantization of an activation, with its observed range.

    Calibration (`calibrate`) runs the float model and records the range (running min/max, or the
    mean of per-batch percentiles); afterwards the range is fixed in eval mode and tracked by an
    exponential moving average in training mode (quantization-aware fine-tuning). Outside the range
    the gradient is zero (clipped straight-through estimator).
    """

    def __init__(self, bits: int = 8, momentum: float = 0.01, output_of: str | None = None):
        super().__init__()
        # set on the quantizer of an int8 conv's output (after its BatchNorm): the layer's name, so that
        # export puts the same QuantizeLinear on that conv's output and ONNX Runtime can run it as QLinearConv
        self.output_of = output_of
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("observed_batches", torch.tensor(0))
        self.observer: str | None = None  # set while calibrating
        self.percentile = 99.99

    @property
    def calibrated(self) -> bool:
        return bool(self.observed_batches > 0)

    def _observe(self, x: Tensor) -> None:
        x = x.detach().float()
        if self.observer == "percentile":
            flat = x.flatten()
            if flat.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample suffices
                flat = flat[:: flat.numel() // 1_000_000 + 1]
            q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100, self.percentile / 100],
                                                  device=flat.device))
            n = self.observed_batches.float()
            lo = q[0] if n == 0 else (self.min_val * n + q[0]) / (n + 1)
            hi = q[1] if n == 0 else (self.max_val * n + q[1]) / (n + 1)
        else:
            lo = torch.minimum(self.min_val, x.min())
            hi = torch.maximum(self.max_val, x.max())
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.observed_batches += 1

    def _track(self, x: Tensor) -> None:
        if not self.calibrated:
            self.observer = "minmax"
            self._observe(x)
            self.observer = None
            return
        m = self.momentum
        self.min_val.mul_(1 - m).add_(m * x.detach().min())
        self.max_val.mul_(1 - m).add_(m * x.detach().max())

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point; the range always contains 0 so that zero is exact."""
        lo = torch.clamp(self.min_val, max=0.0)
        hi = torch.clamp(self.max_val, min=0.0)
        scale = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=1e-12)
        zero_point = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        return scale, zero_point

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self._observe(x)
            return x
        if self.training or not self.calibrated:
            self._track(x)
        scale, zero_point = self.qparams()
        lo = (self.qmin - zero_point) * scale
        hi = (self.qmax - zero_point) * scale
        clipped = torch.clamp(x, lo, hi)
        q = torch.clamp(torch.round(clipped / scale) + zero_point, self.qmin, self.qmax)
        return _straight_through(clipped, (q - zero_point) * scale)

    def extra_repr(self) -> str:
        where = f", output of {self.output_of}" if self.output_of else ""
        return (f"int{(self.qmax - self.qmin + 1).bit_length() - 1}, range=[{self.min_val:.4g}, {self.max_val:.4g}]"
                f"{where}")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor | tuple], observer: str = "minmax",
              percentile: float = 99.99) -> nn.Module:
    """Record every activation quantizer's range on `batches` (inputs, or (inputs, labels) pairs)."""
    if observer not in OBSERVERS:
        raise AutorankError(f"observer {observer!r}: choose from {', '.join(OBSERVERS)}")
    quantizers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    if not quantizers:
        return model
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.min_val.fill_(float("inf"))
        q.max_val.fill_(float("-inf"))
        q.observed_batches.zero_()
        q.observer, q.percentile = observer, percentile
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    try:
        seen = 0
        for batch in batches:
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            model(inputs.to(device))
            seen += 1
        if seen == 0:
            raise AutorankError("calibration data is empty")
    finally:
        for q in quantizers:
            q.observer = None
        model.train(was_training)
    return model


def _plain_copy(module: nn.Conv2d | nn.Linear) -> nn.Conv2d | nn.Linear:
    """A fresh, unparametrized layer holding the fake-quantized weight as plain floats.

    (parametrize.remove_parametrizations would delete the weight property from the parametrized
    class, which deep copies share, breaking the original model.)"""
    kw = {"device": module.weight.device, "dtype": module.weight.dtype, "bias": module.bias is not None}
    if isinstance(module, nn.Conv2d):
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                          padding=module.padding, dilation=module.dilation, groups=module.groups,
                          padding_mode=module.padding_mode, **kw)
    else:
        plain = nn.Linear(module.in_features, module.out_features, **kw)
    with torch.no_grad():
        plain.weight.copy_(module.weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    plain.train(module.training)
    return plain


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """A copy with plain float layers (quantized weight values baked in) and no activation quantizers.

    Module names are kept (activation quantizers become nn.Identity), so a state_dict key
    `x.parametrizations.weight.original` becomes `x.weight`."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, ActivationFakeQuant):
            plain.set_submodule(name, nn.Identity())
        elif isinstance(module, nn.Conv2d | nn.Linear) and parametrize.is_parametrized(module, "weight"):
            plain.set_submodule(name, _plain_copy(module))
    return plain
