"""Data-aware fitting: decomposed chains refitted to reproduce the original layers' outputs.

A weight-space decomposition minimises the kernel error, which says little about the error on real
activations, and errors compound through the network. `fit_chains` refits every decomposed chain,
layer by layer in execution order, within one forward pass of the compressed network over the
calibration images: a forward pre-hook on each chain sees the compressed network's own input (so
upstream errors are compensated), fits the chain to the original layer's output on the same images,
and the chain then runs with its fitted weights for the layers downstream.

Per chain (closed form, from Gram matrices accumulated over image chunks, never storing patches):
- "last": least squares for the last factor (bias included where the layer has one);
- "pair" (default): reduced-rank regression of the last two factors together where the second to
  last is an ordinary conv/linear (Tucker-2 core + output 1x1, TT's 1xk + output 1x1, both SVD
  halves), i.e. the best rank-R map from that factor's input patches to the target; CP's factor
  before the last is depthwise, so CP gets the last-factor fit. With int8/int4 weights the last
  factor is then refitted to the quantized output of the one before it.
A fit that would increase the chain's output error on the calibration images is rolled back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autorank.errors import AutorankError

from .decompose import _explicit_padding, _work_dtype
from .quantize import ActivationFakeQuant

FIT_MODES = ("pair", "last")
RIDGE = 1e-6  # relative to the mean Gram diagonal: keeps dead (all-zero) channels solvable


@dataclass
class FitStats:
    """Relative output error of one chain on the calibration images, before and after its fit."""

    before: float
    after: float


def fit_chains(compressed: nn.Module, original: nn.Module, names: Iterable[str], images: Iterable[Tensor],
               *, mode: str = "pair", chunk: int = 64) -> dict[str, FitStats]:
    """Refit the decomposed chains `names` of `compressed`, in place, to the outputs of the same-named
    layers of `original` on `images` (batches of inputs); returns the per-chain errors."""
    if mode not in FIT_MODES:
        raise AutorankError(f"fit mode {mode!r}: choose from {', '.join(FIT_MODES)}")
    device = next(compressed.parameters()).device
    x = torch.cat([b.to(device) for b in images])
    if len(x) == 0:
        raise AutorankError("fit: no calibration images")
    targets: dict[str, Tensor] = {}
    stats: dict[str, FitStats] = {}

    def keep(name: str):
        return lambda _m, _i, out: targets.__setitem__(name, out.detach())

    def fit(name: str):
        return lambda chain, inputs: stats.__setitem__(
            name, _fit_chain(chain, inputs[0].detach(), targets.pop(name), mode, chunk))

    quantizers = [m for m in compressed.modules() if isinstance(m, ActivationFakeQuant)]
    states = (original.training, compressed.training)
    names = list(names)
    handles = [original.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            original.to(device).eval()(x)
        handles += [compressed.get_submodule(n).register_forward_pre_hook(fit(n)) for n in names]
        for q in quantizers:  # float activations while fitting (calibration sets the ranges afterwards)
            q.observer = "minmax"
        with torch.no_grad():
            compressed.eval()(x)
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.observer = None
            q.min_val.fill_(float("inf"))
            q.max_val.fill_(float("-inf"))
            q.observed_batches.zero_()
        original.train(states[0])
        compressed.train(states[1])
    return stats


def _fit_chain(chain: nn.Sequential, x: Tensor, y: Tensor, mode: str, chunk: int) -> FitStats:
    modules = list(chain)
    weighted = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d | nn.Linear)]
    last = weighted[-1]
    saved = {k: v.clone() for k, v in chain.state_dict().items()}
    before = _rel_error(modules, x, y, chunk)
    second = modules[weighted[-2]] if len(weighted) > 1 else None
    if mode != "last" and second is not None and _pairable(second, modules[last]):
        _fit_pair(modules, weighted[-2], last, x, y, chunk)
    _fit_last(modules, last, x, y, chunk)
    after = _rel_error(modules, x, y, chunk)
    if after > before:  # never worse on the images it was fitted to
        chain.load_state_dict(saved)
        after = before
    return FitStats(before, after)


def _pairable(first: nn.Module, last: nn.Module) -> bool:
    """An ordinary conv/linear with zero padding, narrower than the output (a true low-rank pair)."""
    width = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
    outputs = last.out_channels if isinstance(last, nn.Conv2d) else last.out_features
    return getattr(first, "groups", 1) == 1 and getattr(first, "padding_mode", "zeros") == "zeros" \
        and width <= outputs


def _chunks(x: Tensor, chunk: int) -> Iterable[tuple[int, Tensor]]:
    for start in range(0, len(x), chunk):
        yield start, x[start:start + chunk]


def _rel_error(modules: list[nn.Module], x: Tensor, y: Tensor, chunk: int) -> float:
    """(Modules, not the chain itself: calling the chain would re-enter its fitting hook.)"""
    err = sum(float(torch.linalg.vector_norm(_run(modules, len(modules), xc) - y[s:s + len(xc)]) ** 2)
              for s, xc in _chunks(x, chunk))
    return (err / max(float(torch.linalg.vector_norm(y)) ** 2, 1e-30)) ** 0.5


def _run(modules: list[nn.Module], stop: int, x: Tensor) -> Tensor:
    for m in modules[:stop]:
        x = m(x)
    return x


def _patches(module: nn.Module, z: Tensor) -> Tensor:
    """Rows = output positions, columns = the module's receptive field (weight.flatten(1) order)."""
    if isinstance(module, nn.Linear):
        return z.reshape(-1, z.shape[-1])
    cols = F.unfold(z, module.kernel_size, dilation=module.dilation, padding=_explicit_padding(module),
                    stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(y: Tensor) -> Tensor:
    """Rows = output positions, columns = channels."""
    return y.movedim(1, -1).reshape(-1, y.shape[1]) if y.ndim == 4 else y.reshape(-1, y.shape[-1])


def _moments(modules: list[nn.Module], stop: int, x: Tensor, y: Tensor, chunk: int,
             intercept: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centred (if `intercept`) covariances of module `stop`'s input patches and the target rows:
    (Σ_ff, Σ_fy, mean_f, mean_y)."""
    dtype = _work_dtype(x.device)
    gram = cross = sum_f = sum_y = None
    n = 0
    for s, xc in _chunks(x, chunk):
        f = _patches(modules[stop], _run(modules, stop, xc)).to(dtype)
        t = _rows(y[s:s + len(xc)]).to(dtype)
        gram = f.T @ f if gram is None else gram + f.T @ f
        cross = f.T @ t if cross is None else cross + f.T @ t
        sum_f = f.sum(0) if sum_f is None else sum_f + f.sum(0)
        sum_y = t.sum(0) if sum_y is None else sum_y + t.sum(0)
        n += len(f)
    mean_f, mean_y = sum_f / n, sum_y / n
    if not intercept:
        mean_f, mean_y = torch.zeros_like(mean_f), torch.zeros_like(mean_y)
    return gram / n - torch.outer(mean_f, mean_f), cross / n - torch.outer(mean_f, mean_y), mean_f, mean_y


def _solve(cov: Tensor, cross: Tensor) -> Tensor:
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve(cov + RIDGE * cov.diagonal().mean().clamp_min(1e-30) * eye, cross)


def _set(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Write float weights (under any fake-quant parametrization) and, where the module has one, the bias."""
    param = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") \
        else module.weight
    with torch.no_grad():
        param.copy_(weight.reshape(param.shape).to(param.dtype))
        if module.bias is not None and bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))


def _fit_last(modules: list[nn.Module], last: int, x: Tensor, y: Tensor, chunk: int) -> None:
    """Least squares for the last factor, given the (possibly quantized) factors before it."""
    module = modules[last]
    intercept = module.bias is not None
    cov, cross, mean_f, mean_y = _moments(modules, last, x, y, chunk, intercept)
    w = _solve(cov, cross)  # features x outputs
    _set(module, w.T, mean_y - mean_f @ w)


def _fit_pair(modules: list[nn.Module], first: int, last: int, x: Tensor, y: Tensor, chunk: int) -> None:
    """Reduced-rank regression: the best rank-R map from `first`'s input patches to the target,
    split as first = V^T W (R x patch) and last = V (T x R), V = top-R principal directions of the
    fitted output."""
    module = modules[first]
    rank = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    cov, cross, _, _ = _moments(modules, first, x, y, chunk, modules[last].bias is not None)
    w = _solve(cov, cross)  # patch x T
    _, vectors = torch.linalg.eigh(w.T @ cov @ w)  # the fitted output's covariance, T x T
    v = vectors[:, -rank:]
    _set(module, (w @ v).T, None)
    _set(modules[last], v, None)  # its bias (and its fit to the quantized first factor): `_fit_last`
