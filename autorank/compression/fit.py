"""Data-aware fitting: decomposed chains refitted to reproduce the original layers' outputs.

A weight-space decomposition minimises the kernel error, which says little about the error on real
activations, and errors compound through the network. `fit_chains` refits every decomposed chain,
layer by layer in execution order, within one forward pass of the compressed network over the
calibration images: a forward pre-hook on each chain sees the compressed network's own input (so
upstream errors are compensated), fits the chain to the original layer's output on the same images,
and the chain then runs with its fitted weights for the layers downstream.

Per chain (closed form, from second moments accumulated over the images, never storing patches
beyond one chain's input):
- "als" (default): alternating least squares over the chain. The chain's first factor is a 1x1 conv
  (or Linear) A and the factors after it compose to one kernel E with the layer's window, so the
  chain computes y = sum_o E_o A x_o + b over the window offsets o of the layer's input patches x;
  each step is a least-squares problem on the moments of x and y, computed once: A given the rest
  (conjugate gradients on its normal equations), then Tucker-2's core and output 1x1 together
  (reduced-rank regression, as "pair"), CP's two depthwise factors one after the other, and finally
  the last factor (bias included) given the quantized factors before it, rounded with its rounding
  errors compensated (GPTQ) where it is int8/int4. Six sweeps; the one with the lowest error is kept.
  On ResNet-20 (convs at 30%, int8) it took data-aware zero-shot accuracy from 72.5% to 75.6%
  (Tucker-2) and from 84.2% to 85.05% (CP) over "pair" (docs/COMPRESSION.md).
- "pair": reduced-rank regression of the last two factors together where the second to last is an
  ordinary conv/linear (Tucker-2 core + output 1x1, TT's 1xk + output 1x1, both SVD halves), i.e.
  the best rank-R map from that factor's input patches to the target; CP's factor before the last
  is depthwise, so CP gets the last-factor fit. With int8/int4 weights the last factor is then
  refitted to the quantized output of the one before it.
- "last": least squares for the last factor (bias included where the layer has one).
Chains "als" cannot express (a first factor that is not 1x1) get "pair". A layer kept whole at
int8/int4 keeps its weights; only their rounding is fitted (GPTQ on the Gram matrix of its input patches).
A fit that would increase the layer's output error on the calibration images is rolled back.
Where one layer alone is replaced (a sensitivity table's candidates), `RecordedLayer` records its input
and output once and keeps the moments, so each candidate's fit costs no network pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autorank.errors import AutorankError

from .decompose import _explicit_padding, _work_dtype
from .quantize import INT_BITS, QMAX, ActivationFakeQuant, quantize_weight, weight_precision

FIT_MODES = ("als", "pair", "last")
GPTQ_DAMPING = 0.01  # relative to the mean Hessian diagonal (GPTQ's default)
ALS_SWEEPS = 6
CG_ITERATIONS = 60
MAX_ROWS = 1 << 17  # patch rows per chain for the moments: ample for <= 600 features, bounds the cost
RIDGE = 1e-6  # relative to the mean Gram diagonal: keeps dead (all-zero) channels solvable


@dataclass
class FitStats:
    """Relative output error of one chain on the calibration images, before and after its fit."""

    before: float
    after: float


def fit_chains(compressed: nn.Module, original: nn.Module, names: Iterable[str], images: Iterable[Tensor],
               *, mode: str = "als", chunk: int = 64) -> dict[str, FitStats]:
    """Refit the decomposed chains `names` of `compressed` (and round the int8/int4 layers kept whole among
    them), in place, to the outputs of the same-named layers of `original` on `images` (batches of
    inputs); returns the per-layer errors."""
    _check_mode(mode)
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
            name, _fit_chain(chain, original.get_submodule(name), inputs[0].detach(), targets.pop(name), mode,
                             chunk))

    state = original.training
    names = list(names)
    handles = [original.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            original.to(device).eval()(x)
        handles += [compressed.get_submodule(n).register_forward_pre_hook(fit(n)) for n in names]
        with _float_activations(compressed), torch.no_grad():
            compressed(x)
    finally:
        for h in handles:
            h.remove()
        original.train(state)
    return stats


class RecordedLayer:
    """One layer's input and output in the original network on the calibration images, recorded in one
    pass, and the second moments the "als" fit computes from them.

    A chain that replaces this layer alone (every other layer as in the original: a sensitivity table's
    candidates) sees exactly this input, so fitting each candidate of the layer needs no network pass
    and no new moments: `compress(model, plan, fit=RecordedLayer(model, name, images))`.
    """

    def __init__(self, original: nn.Module, name: str, images: Iterable[Tensor]):
        self.name = name
        self.layer = original.get_submodule(name)
        device = next(original.parameters()).device
        x = torch.cat([b.to(device) for b in images])
        if len(x) == 0:
            raise AutorankError("fit: no calibration images")
        seen: list[tuple[Tensor, Tensor]] = []
        handle = self.layer.register_forward_hook(lambda _m, i, out: seen.append((i[0].detach(), out.detach())))
        state = original.training
        try:
            with torch.no_grad():
                original.eval()(x)
        finally:
            handle.remove()
            original.train(state)
        if len(seen) != 1:
            raise AutorankError(f"fit: layer {name} ran {len(seen)} times in one forward pass; its chain is fitted "
                                "within the network (fit_chains), not from one recorded input")
        self.inputs, self.outputs = seen[0]
        self._moments: dict[bool, _Moments] = {}

    def moments(self, intercept: bool) -> _Moments:
        if intercept not in self._moments:
            self._moments[intercept] = _chain_moments(self.layer, self.inputs, self.outputs, intercept)
        return self._moments[intercept]


def fit_recorded(compressed: nn.Module, recorded: RecordedLayer, *, mode: str = "als",
                 chunk: int = 64) -> FitStats:
    """Refit the chain that replaced `recorded`'s layer in `compressed`, in place, to its recorded output."""
    _check_mode(mode)
    chain = compressed.get_submodule(recorded.name)
    with _float_activations(compressed), torch.no_grad():
        return _fit_chain(chain, recorded.layer, recorded.inputs, recorded.outputs, mode, chunk, recorded.moments)


def _check_mode(mode: str) -> None:
    if mode not in FIT_MODES:
        raise AutorankError(f"fit mode {mode!r}: choose from {', '.join(FIT_MODES)}")


@contextmanager
def _float_activations(compressed: nn.Module) -> Iterator[None]:
    """Float activations while fitting (calibration sets the quantizers' ranges afterwards), eval mode."""
    quantizers = [m for m in compressed.modules() if isinstance(m, ActivationFakeQuant)]
    state = compressed.training
    for q in quantizers:
        q.observer = "minmax"
    compressed.eval()
    try:
        yield
    finally:
        for q in quantizers:
            q.observer = None
            q.min_val.fill_(float("inf"))
            q.max_val.fill_(float("-inf"))
            q.observed_batches.zero_()
        compressed.train(state)


def _fit_chain(chain: nn.Module, layer: nn.Module, x: Tensor, y: Tensor, mode: str, chunk: int,
               moments: Callable[[bool], _Moments] | None = None) -> FitStats:
    modules = list(chain) if isinstance(chain, nn.Sequential) else [chain]
    weighted = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(weighted) == 1:  # a layer kept whole at int8/int4
        return _round_whole(modules, modules[weighted[0]], layer, x, y, chunk, moments)
    last = weighted[-1]
    saved = {k: v.clone() for k, v in chain.state_dict().items()}
    before = _rel_error(modules, x, y, chunk)
    second = modules[weighted[-2]] if len(weighted) > 1 else None
    if mode == "als" and _composable([modules[i] for i in weighted], layer):
        intercept = modules[last].bias is not None
        m = moments(intercept) if moments is not None else _chain_moments(layer, x, y, intercept)
        _fit_als([modules[i] for i in weighted], m)
    else:
        if mode != "last" and second is not None and _pairable(second, modules[last]):
            _fit_pair(modules, weighted[-2], last, x, y, chunk)
        _fit_last(modules, last, x, y, chunk)
    after = _rel_error(modules, x, y, chunk)
    if after > before:  # never worse on the images it was fitted to
        chain.load_state_dict(saved)
        after = before
    return FitStats(before, after)


def _round_whole(modules: list[nn.Module], module: nn.Module, layer: nn.Module, x: Tensor, y: Tensor, chunk: int,
                 moments: Callable[[bool], _Moments] | None) -> FitStats:
    """A layer kept whole keeps its weights; only their rounding to int8/int4 is fitted (`_rounded` on the
    Gram matrix of the layer's input patches), so that the errors of rounding one input are carried by
    the inputs correlated with it rather than added up."""
    before = _rel_error(modules, x, y, chunk)
    saved = module.parametrizations.weight.original.detach().clone()
    m = moments(False) if moments is not None else _chain_moments(layer, x, y, False)
    _set(module, _rounded(module, layer.weight.detach().flatten(1).to(m.xx.dtype), m.xx), None)
    after = _rel_error(modules, x, y, chunk)
    if after > before:
        _set(module, saved, None)
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
        x = m.forward(x)  # not m(x): a layer kept whole carries its own fitting hook
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
    """Least squares from normal equations, with a ridge relative to the mean Gram diagonal."""
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve(cov + RIDGE * cov.diagonal().mean().clamp_min(1e-30) * eye, cross)


def _reduced_rank(cov: Tensor, cross: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-R linear map from features to targets, split as (V^T W: R x features, V: T x R),
    V = the top-R principal directions of the fitted output."""
    w = _solve(cov, cross)  # features x T
    _, vectors = torch.linalg.eigh(w.T @ cov @ w)  # the fitted output's covariance, T x T
    v = vectors[:, -rank:]
    return (w @ v).T, v


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
    w = _rounded(module, _solve(cov, cross).T, cov)  # outputs x features
    _set(module, w, mean_y - mean_f @ w.T)


def _rounded(module: nn.Module, weight: Tensor, cov: Tensor) -> Tensor:
    """`weight` (outputs x features: a chain's least-squares last factor, or a layer kept whole) rounded
    to the module's integer grid with the error of each rounded column compensated on the columns not
    yet rounded, given the Gram matrix `cov` of its inputs (GPTQ, Frantar et al. 2023), where the module
    stores int8/int4 weights, so that its fake quantizer computes this weight; others unchanged. Why: a
    chain's last rounding is the one error no later step absorbs, and it grows with the rank it sums
    over: CP at rank 136 on ResNet-20's layer3.0.conv1 fitted to a relative output error of 0.040 before
    its int4 rounding to nearest and 0.233 after it (docs/COMPRESSION.md)."""
    precision = weight_precision(module)
    if precision not in INT_BITS:
        return weight
    plain = quantize_weight(weight, precision)  # round to nearest: the fallback
    h = cov.double()
    dead = h.diagonal() <= 0
    if bool(dead.all()):
        return plain
    qmax = QMAX[precision]
    w = weight.double().clone()
    absmax = w.abs().amax(1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    order = torch.argsort(h.diagonal(), descending=True)  # most active inputs first ("act order")
    w, h = w[:, order], h[order][:, order]
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    h = h + eye * (GPTQ_DAMPING * h.diagonal().mean()) + torch.diag(dead[order].to(h.dtype))
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.empty_like(w)
    for i in range(w.shape[1]):
        levels[:, i] = torch.clamp(torch.round(w[:, i] / scale), -qmax, qmax)
        error = (w[:, i] - levels[:, i] * scale) / inverse[i, i]
        w[:, i + 1:] -= error[:, None] * inverse[i, i + 1:][None, :]
    rounded = torch.empty_like(levels)
    rounded[:, order] = levels * scale[:, None]
    # a row whose largest level fell below qmax would be re-scaled by the fake quantizer: round it plainly
    kept = levels.abs().amax(1) == qmax
    return torch.where(kept[:, None], rounded.to(weight.dtype), plain)


def _fit_pair(modules: list[nn.Module], first: int, last: int, x: Tensor, y: Tensor, chunk: int) -> None:
    """Reduced-rank regression: the best rank-R map from `first`'s input patches to the target,
    split as first = V^T W (R x patch) and last = V (T x R), V = top-R principal directions of the
    fitted output."""
    module = modules[first]
    rank = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    cov, cross, _, _ = _moments(modules, first, x, y, chunk, modules[last].bias is not None)
    head, tail = _reduced_rank(cov, cross, rank)
    _set(module, head, None)
    _set(modules[last], tail, None)  # its bias (and its fit to the quantized first factor): `_fit_last`


# ---------------------------------------------------------------- alternating least squares on moments
#
# A chain with a 1x1 (or Linear) first factor A, followed by modules that compose to one kernel with the
# original layer's window, computes y = sum_o E_o A x_o + b over the window offsets o of the original
# layer's input patches x. Every step below is then a least-squares problem on the second moments of
# those patches and of the target, computed once per chain: no further passes over the images.


@dataclass
class _Moments:
    """Centred (or raw, without an intercept) moments of input patches x (C*kh*kw) and targets y (T)."""

    xx: Tensor
    xy: Tensor
    yy: Tensor
    mean_x: Tensor
    mean_y: Tensor
    window: tuple[int, int]


def _dense(module: nn.Module) -> Tensor:
    """The module's (effective, i.e. quantized) weight as a dense (out, in, kh, kw) float64 kernel."""
    w = module.weight.detach().double()
    if w.ndim == 2:
        return w[:, :, None, None]
    groups = module.groups
    if groups == 1:
        return w
    out, per, kh, kw = w.shape
    dense = w.new_zeros(out, per * groups, kh, kw)
    step = out // groups
    for g in range(groups):
        dense[g * step:(g + 1) * step, g * per:(g + 1) * per] = w[g * step:(g + 1) * step]
    return dense


def _composite(modules: list[nn.Module]) -> Tensor:
    """One kernel for a stack of convs (cross-correlations compose by adding offsets); no biases."""
    kernel = _dense(modules[0])
    for module in modules[1:]:
        w = _dense(module)
        t, _, a, b = w.shape
        out = kernel.new_zeros(t, kernel.shape[1], kernel.shape[2] + a - 1, kernel.shape[3] + b - 1)
        for i in range(a):
            for j in range(b):
                out[:, :, i:i + kernel.shape[2], j:j + kernel.shape[3]] += torch.einsum(
                    "ts,srij->trij", w[:, :, i, j], kernel)
        kernel = out
    return kernel


def _composable(modules: list[nn.Module], layer: nn.Module) -> bool:
    """First factor 1x1/Linear (groups 1), and the rest compose to the layer's window with at most one
    factor spanning each spatial axis (so strides and paddings compose exactly)."""
    if len(modules) < 2 or getattr(modules[0], "groups", 1) != 1:
        return False
    if isinstance(layer, nn.Linear):
        return all(isinstance(m, nn.Linear) for m in modules)
    sizes = [tuple(m.kernel_size) for m in modules if isinstance(m, nn.Conv2d)]
    if len(sizes) != len(modules) or sizes[0] != (1, 1):
        return False
    spans = [sum(s[axis] > 1 for s in sizes) for axis in (0, 1)]
    return max(spans) <= 1 and tuple(layer.kernel_size) == tuple(
        max((s[axis] for s in sizes), default=1) for axis in (0, 1))


def _chain_moments(layer: nn.Module, x: Tensor, y: Tensor, intercept: bool) -> _Moments:
    dtype = _work_dtype(x.device)
    f = _patches(layer, x)
    t = _rows(y)
    if len(f) > MAX_ROWS:  # a seeded subset of positions: the moments of a few hundred features converge
        rows = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:MAX_ROWS].to(f.device)
        f, t = f[rows], t[rows]
    mean_x, mean_y = f.to(dtype).mean(0), t.to(dtype).mean(0)
    if not intercept:
        mean_x, mean_y = torch.zeros_like(mean_x), torch.zeros_like(mean_y)
    # Centred in the work dtype, multiplied in the data's (float32 on CPU: the Gram products of ~600
    # features dominated the fit's time in float64; the solves stay in float64).
    f, t = (f - mean_x).to(f.dtype), (t - mean_y).to(t.dtype)
    n = len(f)
    window = tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) else (1, 1)
    return _Moments(*((a.T @ b).to(dtype) / n for a, b in ((f, f), (f, t), (t, t))), mean_x, mean_y, window)


def _step_first(modules: list[nn.Module], m: _Moments, iterations: int = CG_ITERATIONS) -> None:
    """Least squares for the first factor A given the (quantized) factors after it, by conjugate gradients
    on the normal equations sum_{o,p} E_o^T E_p A X_po = sum_o E_o^T Y_o, warm-started from the current A
    (a direct solve of the (R*C)^2 system took seconds per CP layer; each CG step costs a few matmuls)."""
    e = _composite(modules[1:]).flatten(2).permute(2, 0, 1).contiguous()  # window x T x R
    o, t, r = e.shape
    c = len(m.xx) // o
    xx = m.xx.reshape(c, o, c, o).permute(1, 0, 3, 2).reshape(o * c, o * c)  # (offset, channel) order
    e_t = e.transpose(1, 2)  # window x R x T
    rhs = (e_t @ m.xy.reshape(c, o, t).permute(1, 2, 0)).sum(0)  # sum_o E_o^T Y_o, R x C
    ridge = RIDGE * m.xx.diagonal().mean().clamp_min(1e-30) * float((e ** 2).sum()) / max(r, 1)

    def apply(a: Tensor) -> Tensor:
        u = (e @ a).transpose(0, 1).reshape(t, o * c) @ xx  # sum_p E_p A X_po, T x (window, C)
        return (e_t @ u.reshape(t, o, c).transpose(0, 1)).sum(0) + ridge * a

    a = _composite(modules[:1])[:, :, 0, 0]
    residual = rhs - apply(a)
    direction = residual.clone()
    norm = float((residual ** 2).sum())
    floor = 1e-20 * max(float((rhs ** 2).sum()), 1e-300)
    for _ in range(iterations):
        if norm <= floor:
            break
        step = apply(direction)
        alpha = norm / float((direction * step).sum())
        a = a + alpha * direction
        residual = residual - alpha * step
        norm, previous = float((residual ** 2).sum()), norm
        direction = residual + (norm / previous) * direction
    _set(modules[0], a, None)


def _step_depthwise(modules: list[nn.Module], m: _Moments, k: int) -> None:
    """CP's spatial factors: least squares for depthwise module k (1: kh x 1, 2: 1 x kw) given the rest,
    on the moments of z = A x over the window (features sum_j w_r[j] z_r(i, j) for the kh x 1 factor)."""
    a = _composite(modules[:1])[:, :, 0, 0]  # R x C
    r = a.shape[0]
    kh, kw = m.window
    lift = torch.kron(a, torch.eye(kh * kw, dtype=a.dtype, device=a.device))
    zz, zy = lift @ m.xx @ lift.T, lift @ m.xy
    eye = torch.eye(r, dtype=a.dtype, device=a.device)
    other = modules[3 - k].weight.detach().to(a.dtype).reshape(r, -1)
    if k == 1:  # unknown h (R, kh): B[(r, i), (r, i, j)] = w_r[j]
        n = kh
        b = torch.einsum("rs,il,sj->rislj", eye, torch.eye(kh, dtype=a.dtype, device=a.device), other)
    else:  # unknown w (R, kw): B[(r, j), (r, i, j)] = h_r[i]
        n = kw
        b = torch.einsum("rs,jl,si->rjsil", eye, torch.eye(kw, dtype=a.dtype, device=a.device), other)
    b = b.reshape(r * n, r * kh * kw)
    last = modules[-1].weight.detach().to(a.dtype).reshape(modules[-1].weight.shape[0], r)  # T x R
    ff = (b @ zz @ b.T).reshape(r, n, r, n) * (last.T @ last)[:, None, :, None]
    rhs = torch.einsum("tr,rit->ri", last, (b @ zy).reshape(r, n, -1)).reshape(-1)
    solution = _solve(ff.reshape(r * n, r * n), rhs)
    _set(modules[k], solution, None)


def _step_pair(modules: list[nn.Module], m: _Moments) -> None:
    """Tucker-2's core and output 1x1 together given its 1x1 first factor A, by reduced-rank regression
    on the moments of the core's input patches kron(A, I_window) x."""
    first = _composite(modules[:1])[:, :, 0, 0]  # R x C
    lift = torch.kron(first, torch.eye(m.window[0] * m.window[1], dtype=first.dtype, device=first.device))
    core, last = _reduced_rank(lift @ m.xx @ lift.T, lift @ m.xy, modules[1].weight.shape[0])
    _set(modules[1], core, None)
    _set(modules[2], last, None)


def _step_last(modules: list[nn.Module], m: _Moments) -> None:
    """Least squares for the last factor (and the bias) given the (quantized) factors before it."""
    lift = _composite(modules[:-1]).flatten(1)  # R x C*window
    cov = lift @ m.xx @ lift.T
    w = _rounded(modules[-1], _solve(cov, lift @ m.xy).T, cov)  # T x R
    _set(modules[-1], w, m.mean_y - (lift @ m.mean_x) @ w.T)


def _moment_error(modules: list[nn.Module], m: _Moments) -> float:
    w = _composite(modules).flatten(1)  # T x C*window
    return float(m.yy.trace() - 2 * (w @ m.xy).trace() + (w @ m.xx @ w.T).trace())


def _fit_als(modules: list[nn.Module], m: _Moments) -> None:
    """Alternate: first factor, then the rest (the pair where the chain is first-core-last, else the
    last factor), ending on the last factor fitted to the quantized factors before it; the sweep with
    the lowest moment error is kept."""
    pair = len(modules) == 3 and _pairable(modules[1], modules[2])
    depthwise = len(modules) == 4 and all(getattr(mod, "groups", 1) == mod.weight.shape[0] > 1
                                          for mod in modules[1:3])
    best, saved = float("inf"), None
    for _ in range(ALS_SWEEPS):
        _step_first(modules, m)
        if pair:
            _step_pair(modules, m)
        if depthwise:
            _step_depthwise(modules, m, 1)
            _step_depthwise(modules, m, 2)
        _step_last(modules, m)
        error = _moment_error(modules, m)
        if error < best:
            best, saved = error, [{k: v.clone() for k, v in mod.state_dict().items()} for mod in modules]
    for module, state in zip(modules, saved, strict=True):
        module.load_state_dict(state)
