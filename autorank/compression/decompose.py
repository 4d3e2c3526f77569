"""Decompositions of pretrained layers into chains of plain nn.Conv2d / nn.Linear modules.

Factors come from tensorly (CP-ALS with SVD init, partial Tucker/HOOI, TT-SVD) run with its pytorch
backend on the layer's device in float64; the chains carry the original stride, padding, dilation,
padding mode and bias so that ONNX export, quantization and fusion treat them as ordinary layers.

Chains (kernel K of shape T x C x kh x kw):
- CP-4:     1x1 (C->R) -> kh x 1 depthwise -> 1 x kw depthwise -> 1x1 (R->T)
- Tucker-2: 1x1 (C->R1) -> kh x kw (R1->R2) -> 1x1 (R2->T)
- TT over (C, kh, kw, T): 1x1 (C->r1) -> kh x 1 (r1->r2) -> 1 x kw (r2->r3) -> 1x1 (r3->T)
- SVD:      Linear (in->r) -> Linear (r->out)

Which function serves which method is the registry's (`methods.py`: `build_chain`, `decompose_layer`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product

import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor
from tensorly.decomposition import parafac, partial_tucker, tensor_train
from tensorly.tenalg import unfolding_dot_khatri_rao
from torch import nn

from autorank.errors import AutorankError


CP_STABILIZE = ("epc", "balance", "none")


@dataclass
class CPFactors:
    """CP factors of a conv kernel, one matrix per mode (T, C, kh, kw), each I_n x R; weights folded in."""

    factors: list[torch.Tensor]
    error: float  # relative Frobenius error ||K - [[factors]]|| / ||K||

    def to_tensor(self) -> torch.Tensor:
        return _cp_tensor(self.factors)

    @property
    def sensitivity(self) -> float:
        """Sum of squared factor norms: the quantity EPC minimises (large = cancelling components)."""
        return float(sum((f**2).sum() for f in self.factors))


@contextmanager
def _tensorly() -> Iterator[None]:
    """tensorly's pytorch backend for this block only (tltorch would switch it globally), without
    its warning when a requested rank exceeds a mode's size (the SVD init then pads).

    CPU work runs on one intra-op thread: kernels are small, and on a busy 2-core machine two threads
    made CP-ALS 5x and HOOI 50x slower (threads spin-waiting). The setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Trying to compute SVD")
            yield
    finally:
        torch.set_num_threads(threads)


def _cp_tensor(factors: list[torch.Tensor]) -> torch.Tensor:
    with _tensorly():
        return cp_to_tensor((None, factors))


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _rel_error(kernel: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(kernel - approx) / torch.linalg.vector_norm(kernel).clamp_min(1e-30))


# ---------------------------------------------------------------- CP


def balance_cp(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every component the same norm in each of its factors (the product is unchanged)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # N x R
    total = norms.prod(dim=0)
    target = total.clamp_min(0) ** (1.0 / len(factors))
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return [f * torch.where(n > 0, t / s, torch.zeros_like(t))
            for f, n, s, t in zip(factors, norms, safe, target.expand_as(norms), strict=True)]


def _exact_cp(kernel: torch.Tensor) -> list[torch.Tensor]:
    """An exact CP decomposition at the trivial full rank: unit vectors enumerate every mode but the
    largest, whose factor holds the matching fibre of the kernel."""
    dims = kernel.shape
    data_mode = max(range(kernel.ndim), key=lambda m: dims[m])
    others = [m for m in range(kernel.ndim) if m != data_mode]
    rank = math.prod(dims[m] for m in others)
    factors = [torch.zeros(d, rank, dtype=kernel.dtype, device=kernel.device) for d in dims]
    moved = kernel.movedim(data_mode, -1)  # other modes in order, data mode last
    for r, idx in enumerate(product(*(range(dims[m]) for m in others))):
        for m, i in zip(others, idx, strict=True):
            factors[m][i, r] = 1.0
        factors[data_mode][:, r] = moved[idx]
    return factors


def _mttkrp(kernel: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    with _tensorly():
        return unfolding_dot_khatri_rao(kernel, (None, factors), mode)


def epc_correct(kernel: torch.Tensor, factors: list[torch.Tensor], error_bound: float,
                n_iter: int = 50) -> list[torch.Tensor]:
    """EPC-style stabilisation (Phan et al., ECCV 2020): lower the sensitivity (sum of squared factor
    norms) while keeping ||K - [[A]]|| <= error_bound.

    Ridge-penalised ALS sweeps A_n = K_(n) KR_n (G_n + mu I)^-1 trade the error decrease that plain ALS
    would still make for smaller, non-cancelling components; a sweep is accepted only if the error
    stays within the bound (mu is halved otherwise, doubled after a success). The initial, balanced
    factors satisfy the bound, so the result is never worse in error and never more sensitive.
    """
    norm_k = torch.linalg.vector_norm(kernel)
    best = balance_cp(factors)
    best_sens = sum(float((f**2).sum()) for f in best)
    rank = best[0].shape[1]
    eye = torch.eye(rank, dtype=kernel.dtype, device=kernel.device)
    mu = 1e-3 * float(norm_k) ** (2 / len(factors))
    current = best
    for _ in range(n_iter):
        candidate = list(current)
        for mode in range(len(candidate)):
            gram = torch.ones(rank, rank, dtype=kernel.dtype, device=kernel.device)
            for m, f in enumerate(candidate):
                if m != mode:
                    gram = gram * (f.T @ f)
            rhs = _mttkrp(kernel, candidate, mode)
            candidate[mode] = torch.linalg.solve(gram + mu * eye, rhs.T).T
        candidate = balance_cp(candidate)
        err = float(torch.linalg.vector_norm(kernel - _cp_tensor(candidate)))
        if err <= error_bound:
            current = candidate
            sens = sum(float((f**2).sum()) for f in candidate)
            if sens < best_sens:
                best, best_sens = candidate, sens
            mu *= 2.0
        else:
            mu *= 0.5
    return best


def decompose_cp(kernel: torch.Tensor, rank: int, *, stabilize: str = "epc", n_iter_max: int = 100,
                 epc_iter: int = 50, seed: int = 0) -> CPFactors:
    """CP-ALS (SVD init) of a 4-way kernel; at the full rank an exact construction is used instead."""
    if stabilize not in CP_STABILIZE:
        raise AutorankError(f"cp stabilisation {stabilize!r}: choose from {', '.join(CP_STABILIZE)}")
    with _tensorly():
        return _decompose_cp(kernel.detach().to(_work_dtype(kernel.device)), rank, stabilize, n_iter_max,
                             epc_iter, seed)


def _decompose_cp(work: torch.Tensor, rank: int, stabilize: str, n_iter_max: int, epc_iter: int,
                  seed: int) -> CPFactors:
    if rank >= math.prod(work.shape) // max(work.shape):
        factors = _exact_cp(work)
    else:
        cp = parafac(work, rank, n_iter_max=n_iter_max, init="svd", tol=1e-8, random_state=seed)
        factors = [cp.factors[0] * cp.weights, *cp.factors[1:]]
    if stabilize != "none":
        factors = balance_cp(factors)
    if stabilize == "epc":
        bound = float(torch.linalg.vector_norm(work - _cp_tensor(factors)))
        if bound > 1e-12 * float(torch.linalg.vector_norm(work)):
            factors = epc_correct(work, factors, bound, n_iter=epc_iter)
    return CPFactors(factors, _rel_error(work, _cp_tensor(factors)))


# ---------------------------------------------------------------- chains


def _set_weight(module: nn.Module, layer: nn.Module, tensor: torch.Tensor) -> None:
    """Load a factor into a chain module (in the layer's dtype/device); shapes must already agree."""
    if module.weight.shape != tensor.shape:
        raise RuntimeError(f"factor of shape {tuple(tensor.shape)} does not fit {module} "
                           f"(weight {tuple(module.weight.shape)})")
    module.weight = _like(layer, tensor)


def _like(layer: nn.Module, tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.to(device=layer.weight.device, dtype=layer.weight.dtype).contiguous())


def _conv(layer: nn.Conv2d, cin: int, cout: int, kernel: tuple[int, int], *, spatial: tuple[bool, bool],
          groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A conv of the chain; `spatial` says which axes (h, w) keep the layer's stride/padding/dilation."""
    def pick(value: tuple[int, int], neutral: int) -> tuple[int, int]:
        return tuple(v if keep else neutral for v, keep in zip(value, spatial, strict=True))

    padding = layer.padding if spatial == (True, True) else pick(_explicit_padding(layer), 0)
    return nn.Conv2d(cin, cout, kernel, stride=pick(layer.stride, 1), padding=padding,
                     dilation=pick(layer.dilation, 1), groups=groups, bias=bias,
                     padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype)


def _explicit_padding(layer: nn.Conv2d) -> tuple[int, int]:
    """Per-axis padding, also for padding='valid'/'same' (needed when the kernel is split by axis)."""
    if not isinstance(layer.padding, str):
        return layer.padding
    if layer.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        raise AutorankError("padding='same' with an even effective kernel cannot be split per axis")
    return tuple(t // 2 for t in total)


def _check_conv(layer: nn.Module, method: str) -> nn.Conv2d:
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise AutorankError(f"{method} decomposes nn.Conv2d with groups=1, got {type(layer).__name__}")
    return layer


def _finish(chain: nn.Sequential, layer: nn.Module) -> nn.Sequential:
    last = chain[-1]
    if layer.bias is not None:
        last.bias = _like(layer, layer.bias.detach())
    return chain


def cp_chain(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """The CP-4 chain structure (weights uninitialised)."""
    _check_conv(layer, "cp")
    T, C, kh, kw = layer.weight.shape
    return nn.Sequential(
        _conv(layer, C, rank, (1, 1), spatial=(False, False)),
        _conv(layer, rank, rank, (kh, 1), spatial=(True, False), groups=rank),
        _conv(layer, rank, rank, (1, kw), spatial=(False, True), groups=rank),
        _conv(layer, rank, T, (1, 1), spatial=(False, False), bias=layer.bias is not None),
    )


def tucker2_chain(layer: nn.Conv2d, ranks: tuple[int, int]) -> nn.Sequential:
    _check_conv(layer, "tucker2")
    T, C, kh, kw = layer.weight.shape
    r1, r2 = ranks
    return nn.Sequential(
        _conv(layer, C, r1, (1, 1), spatial=(False, False)),
        _conv(layer, r1, r2, (kh, kw), spatial=(True, True)),
        _conv(layer, r2, T, (1, 1), spatial=(False, False), bias=layer.bias is not None),
    )


def tt_chain(layer: nn.Conv2d, ranks: tuple[int, int, int]) -> nn.Sequential:
    _check_conv(layer, "tt")
    T, C, kh, kw = layer.weight.shape
    r1, r2, r3 = ranks
    return nn.Sequential(
        _conv(layer, C, r1, (1, 1), spatial=(False, False)),
        _conv(layer, r1, r2, (kh, 1), spatial=(True, False)),
        _conv(layer, r2, r3, (1, kw), spatial=(False, True)),
        _conv(layer, r3, T, (1, 1), spatial=(False, False), bias=layer.bias is not None),
    )


def svd_chain(layer: nn.Linear, rank: int) -> nn.Sequential:
    if not isinstance(layer, nn.Linear):
        raise AutorankError(f"svd decomposes nn.Linear, got {type(layer).__name__}")
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False, **kw),
                         nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw))


def cp_conv(layer: nn.Conv2d, rank: int, *, stabilize: str = "epc", n_iter_max: int = 100,
            seed: int = 0) -> nn.Sequential:
    """CP-4 decomposition of a conv into 1x1 -> kx1 dw -> 1xk dw -> 1x1."""
    chain = cp_chain(layer, rank)
    cp = decompose_cp(layer.weight, rank, stabilize=stabilize, n_iter_max=n_iter_max, seed=seed)
    f_t, f_c, f_h, f_w = cp.factors
    _set_weight(chain[0], layer, f_c.T[:, :, None, None])
    _set_weight(chain[1], layer, f_h.T[:, None, :, None])
    _set_weight(chain[2], layer, f_w.T[:, None, None, :])
    _set_weight(chain[3], layer, f_t[:, :, None, None])
    return _finish(chain, layer)


def tucker2_conv(layer: nn.Conv2d, ranks: tuple[int, int], *, n_iter_max: int = 100) -> nn.Sequential:
    """Tucker-2 (HOOI on the channel modes) into 1x1 -> kxk -> 1x1."""
    chain = tucker2_chain(layer, ranks)
    kernel = layer.weight.detach().to(_work_dtype(layer.weight.device))
    r1, r2 = ranks
    with _tensorly():
        (core, (u_out, u_in)), _ = partial_tucker(kernel, rank=[r2, r1], modes=[0, 1],
                                                  n_iter_max=n_iter_max, init="svd")
    _set_weight(chain[0], layer, u_in.T[:, :, None, None])
    _set_weight(chain[1], layer, core)
    _set_weight(chain[2], layer, u_out[:, :, None, None])
    return _finish(chain, layer)


def tt_conv(layer: nn.Conv2d, ranks: tuple[int, int, int]) -> nn.Sequential:
    """TT-SVD of the kernel reordered to (C, kh, kw, T) into 1x1 -> kx1 -> 1xk -> 1x1."""
    chain = tt_chain(layer, ranks)
    kernel = layer.weight.detach().to(_work_dtype(layer.weight.device)).permute(1, 2, 3, 0).contiguous()
    with _tensorly():
        g1, g2, g3, g4 = tensor_train(kernel, rank=[1, *ranks, 1]).factors
    _set_weight(chain[0], layer, g1[0].T[:, :, None, None])
    _set_weight(chain[1], layer, g2.permute(2, 0, 1)[..., None])
    _set_weight(chain[2], layer, g3.permute(2, 0, 1)[:, :, None, :])
    _set_weight(chain[3], layer, g4[:, :, 0].T[:, :, None, None])
    return _finish(chain, layer)


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Truncated SVD W = (U sqrt S)(sqrt S V^T): the singular values split evenly for quantization."""
    chain = svd_chain(layer, rank)
    weight = layer.weight.detach().to(_work_dtype(layer.weight.device))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    _set_weight(chain[0], layer, root[:, None] * vh[:rank])
    _set_weight(chain[1], layer, u[:, :rank] * root[None, :])
    return _finish(chain, layer)
