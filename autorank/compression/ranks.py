"""Rank selection: EVBMF estimates and retention ratios, per decomposition method.

EVBMF (empirical variational Bayesian matrix factorisation) has a global analytic solution
(Nakajima, Tomioka, Sugiyama & Babacan, JMLR 2013): the noise variance is the minimiser of a
one-dimensional objective and the estimated rank is the number of singular values above a closed-form
threshold. No maintained library ships it, so it is implemented here and tested against synthetic
low-rank matrices with known rank.

Rank rules (documented in docs/COMPRESSION.md):
- Tucker-2 (R1, R2), in chain order: R1 = EVBMF rank of the mode-1 (input-channel) unfolding,
  R2 = EVBMF rank of the mode-0 (output-channel) unfolding.
- TT (r1, r2, r3) over (C, kh, kw, T): EVBMF rank of the three TT-SVD unfoldings
  C x (kh kw T), (C kh) x (kw T), (C kh kw) x T — r1 and r3 coincide with Tucker-2's R1, R2.
- CP R: the CP rank with the same parameter count as Tucker-2 at its EVBMF ranks.
- SVD r: EVBMF rank of the weight matrix.
- Weakening (MUSCO): R_w = R_full - w (R_full - R_vbmf), w in [0, 1] (w = 1 is plain EVBMF),
  applied to each EVBMF rank before the CP rule; every rank is clamped to [1, full].
- A retention ratio rho picks ranks whose parameter count is closest to rho x the layer's weight count
  (CP/SVD: the one rank; Tucker-2/TT: ranks proportional to the full ranks, best integer rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from threadpoolctl import ThreadpoolController
from torch import nn

from autorank.errors import AutorankError

# SVDs of layer unfoldings are small: multi-threaded BLAS spends far more on spinning threads than it
# saves (50x slower on a busy 2-core machine), so they run single-threaded.
_BLAS = ThreadpoolController()

# tau-bar(alpha) / sqrt(alpha) from Nakajima et al. (2013), eq. (15): the threshold constant.
_TAU_BAR_SCALE = 2.5129


@dataclass(frozen=True)
class EVBMFResult:
    """EVBMF estimate of a matrix: `rank` singular values survive, with posterior `values`."""

    rank: int
    values: np.ndarray  # posterior-mean singular values of the retained components
    sigma2: float  # estimated noise variance per entry
    threshold: float  # singular values above it are kept
    singular_values: np.ndarray  # all singular values of the input


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Negative free energy (up to constants) as a function of the noise variance (eq. 25)."""
    H = len(s)
    alpha = L / M
    x = np.maximum(s**2 / (M * sigma2), 1e-300)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return float(
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau_z1)
        + np.sum(np.log((tau_z1 + 1) / z1))
        + alpha * np.sum(np.log(tau_z1 / alpha + 1))
        + residual / (M * sigma2)
        + (L - H) * np.log(sigma2)
    )


def evbmf(matrix: torch.Tensor | np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Analytic EVBMF of `matrix`; the noise variance is estimated unless `sigma2` is given.

    The result's `rank` may be 0 (everything looks like noise); callers that need a usable rank go
    through `vbmf_ranks`/`resolve_rank`, which guard that case.
    """
    Y = matrix.detach().double().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if Y.ndim != 2 or min(Y.shape) < 1:
        raise AutorankError(f"evbmf needs a non-empty matrix, got shape {tuple(Y.shape)}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    alpha = L / M
    tau_bar = _TAU_BAR_SCALE * math.sqrt(alpha)
    with _BLAS.limit(limits=1, user_api="blas"):
        s = np.linalg.svd(Y, compute_uv=False)
    if s[0] <= 0:
        return EVBMFResult(0, s[:0], 0.0, 0.0, s)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        # Bounds of the noise variance (Nakajima et al. 2013, section 4.3); H = L so no residual.
        eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
        upper = float(np.sum(s**2) / (L * M))
        lower = float(max(s[eh_ub + 1] ** 2 / (M * xubar), np.mean(s[eh_ub + 1 :] ** 2) / M))
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            opt = minimize_scalar(
                _evb_objective, args=(L, M, s, 0.0, xubar), bounds=(lower, upper), method="bounded"
            )
            sigma2 = float(opt.x)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    kept = s[s > threshold]
    ratio = (L + M) * sigma2 / kept**2
    values = kept / 2 * (1 - ratio + np.sqrt(np.maximum((1 - ratio) ** 2 - 4 * L * M * sigma2**2 / kept**4, 0)))
    return EVBMFResult(int(len(kept)), values, float(sigma2), threshold, s)


def _guarded_rank(matrix: torch.Tensor) -> int:
    """EVBMF rank, with the known failure (rank 0: the noise estimate swallowed every component)
    replaced by the full rank, so that such a layer is left uncompressed instead of destroyed."""
    rank = evbmf(matrix).rank
    return rank if rank > 0 else min(matrix.shape)


def weaken(full: int, estimate: int, weakening: float) -> int:
    """MUSCO weakening R - w (R - r), clamped to [1, R]."""
    return int(min(max(round(full - weakening * (full - estimate)), 1), full))


# ---- shapes, full ranks and parameter counts (closed forms) ----


def full_ranks(method: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The largest meaningful ranks of `method` for a weight of `shape` (the exact-reconstruction ranks)."""
    if method == "svd":
        return (min(shape),)
    T, C, kh, kw = shape
    if method == "tucker2":
        return (C, T)
    if method == "tt":
        return (min(C, kh * kw * T), min(C * kh, kw * T), min(C * kh * kw, T))
    if method == "cp":
        # Trivial upper bound of the CP rank: enumerate all modes but the largest with unit vectors.
        return (math.prod(shape) // max(shape),)
    raise AutorankError(f"unknown decomposition method {method!r}")


def method_params(method: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Weight parameters of the decomposed layer (bias excluded)."""
    if method == "none":
        return math.prod(shape)
    if method == "svd":
        (r,) = ranks
        return r * (shape[0] + shape[1])
    T, C, kh, kw = shape
    if method == "cp":
        (r,) = ranks
        return r * (C + kh + kw + T)
    if method == "tucker2":
        r1, r2 = ranks
        return C * r1 + r1 * r2 * kh * kw + r2 * T
    if method == "tt":
        r1, r2, r3 = ranks
        return C * r1 + r1 * kh * r2 + r2 * kw * r3 + r3 * T
    raise AutorankError(f"unknown decomposition method {method!r}")


# ---- EVBMF ranks per method ----


def vbmf_ranks(weight: torch.Tensor, weakening: float = 1.0) -> tuple[int, int]:
    """Tucker-2 ranks (R1, R2) of a conv weight (T, C, kh, kw), in chain order C->R1->R2->T:
    R1 from the mode-1 unfolding, R2 from the mode-0 unfolding. For a 2-D weight: (r, r)."""
    if weight.ndim == 2:
        r = weaken(min(weight.shape), _guarded_rank(weight), weakening)
        return r, r
    T, C = weight.shape[:2]
    mode0 = weight.reshape(T, -1)
    mode1 = weight.transpose(0, 1).reshape(C, -1)
    return weaken(C, _guarded_rank(mode1), weakening), weaken(T, _guarded_rank(mode0), weakening)


def vbmf_method_ranks(method: str, weight: torch.Tensor, weakening: float = 1.0) -> tuple[int, ...]:
    """EVBMF-derived ranks for `method` (rules in the module docstring)."""
    shape = tuple(weight.shape)
    if method == "svd":
        return (vbmf_ranks(weight, weakening)[0],)
    if method == "tucker2":
        return attainable_ranks("tucker2", shape, vbmf_ranks(weight, weakening))
    if method == "cp":
        budget = method_params("tucker2", shape, vbmf_method_ranks("tucker2", weight, weakening))
        return (_clamp(round(budget / sum(shape)), full_ranks("cp", shape)[0]),)
    if method == "tt":
        T, C, kh, kw = shape
        tensor = weight.permute(1, 2, 3, 0)  # (C, kh, kw, T)
        unfoldings = (tensor.reshape(C, -1), tensor.reshape(C * kh, -1), tensor.reshape(C * kh * kw, -1))
        return attainable_ranks("tt", shape, tuple(
            weaken(full, _guarded_rank(unf), weakening)
            for full, unf in zip(full_ranks("tt", shape), unfoldings, strict=True)
        ))
    raise AutorankError(f"no EVBMF rank rule for method {method!r}")


def attainable_ranks(method: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Clamp ranks to what the decomposition can return, so the chain built from a plan has the
    shapes of the factors and no factor spans directions the kernel does not have.

    TT-SVD returns at most r_k = r_(k-1) n_k channels (C, kh, kw in turn). Tucker-2's channel ranks
    bound each other: the core (R2, R1, kh, kw) has mode ranks r1 <= r2 kh kw and r2 <= r1 kh kw,
    and a factor wider than that is completed from a null space that LAPACK fills differently from
    run to run (a rank [2, 32] 3x3 conv fine-tuned to different accuracies in two identical runs).
    Other methods: unchanged.
    """
    if method == "tucker2" and len(shape) == 4:
        k = shape[2] * shape[3]
        return (min(ranks[0], ranks[1] * k), min(ranks[1], ranks[0] * k))
    if method != "tt":
        return ranks
    T, C, kh, kw = shape
    r1 = min(ranks[0], C)
    r2 = min(ranks[1], r1 * kh)
    return (r1, r2, min(ranks[2], r2 * kw))


def _clamp(rank: int, full: int) -> int:
    return int(min(max(rank, 1), full))


def scaled_ranks(evbmf: tuple[int, ...] | list[int], full: tuple[int, ...] | list[int], multiplier: float) -> list[int]:
    """EVBMF ranks times `multiplier`, rounded and clamped to [1, full rank] (EVBMF as a rank prior)."""
    return [_clamp(round(r * multiplier), f) for r, f in zip(evbmf, full, strict=True)]


def ratio_ranks(method: str, shape: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Ranks whose parameter count is closest to `ratio` x the layer's weight count."""
    target = ratio * math.prod(shape)
    full = full_ranks(method, shape)
    if len(full) == 1:
        per_rank = method_params(method, shape, (1,))
        return (_clamp(round(target / per_rank), full[0]),)
    # Ranks proportional to the full ranks: params(a) is quadratic in the scale a; solve, then try the
    # integer roundings around the solution and keep the closest to the target.
    quad = method_params(method, shape, full) - _linear_part(method, shape, full)
    lin = _linear_part(method, shape, full)
    a = (-lin + math.sqrt(lin * lin + 4 * quad * target)) / (2 * quad)
    base = [a * f for f in full]
    candidates = {
        attainable_ranks(method, shape, tuple(_clamp(math.floor(b) + d, f) for b, d, f in zip(base, delta, full,
                                                                                          strict=True)))
        for delta in product((0, 1), repeat=len(full))
    }
    return min(candidates, key=lambda r: (abs(method_params(method, shape, r) - target), r))


def _linear_part(method: str, shape: tuple[int, ...], full: tuple[int, ...]) -> float:
    """The part of params(a * full) that is linear in a (the outer 1x1 convs)."""
    T, C = shape[:2]
    if method == "tucker2":
        return C * full[0] + full[1] * T
    return C * full[0] + full[2] * T  # tt


def parse_vbmf(spec: str) -> float | None:
    """'vbmf' -> 1.0, 'vbmf:0.6' -> 0.6 (the weakening factor); anything else -> None."""
    if spec == "vbmf":
        return 1.0
    if spec.startswith("vbmf:"):
        try:
            w = float(spec[5:])
        except ValueError:
            return None
        return w if 0.0 <= w <= 1.0 else None
    return None


def resolve_rank(method: str, layer: nn.Module, rank: int | float | str | list[int] | tuple[int, ...] | None
                 ) -> tuple[int, ...]:
    """Integer ranks for `layer` under `method` from any rank spec; raises AutorankError if invalid.

    Specs: None or "vbmf" / "vbmf:W" (EVBMF, weakening W), a float in (0, 1] (parameter retention),
    an int (same rank in every position) or a list of ints (one per rank position).
    """
    shape = tuple(layer.weight.shape)  # (T, C, kh, kw) or (out, in)
    full = full_ranks(method, shape)
    if rank is None or isinstance(rank, str):
        weakening = parse_vbmf(rank or "vbmf")
        if weakening is None:
            raise AutorankError(f"rank {rank!r}: expected 'vbmf', 'vbmf:W' with W in [0,1], a ratio or ints")
        return vbmf_method_ranks(method, layer.weight.detach(), weakening)
    if isinstance(rank, bool):
        raise AutorankError(f"rank {rank!r} is not a rank")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise AutorankError(f"retention ratio {rank} must be in (0, 1]")
        return ratio_ranks(method, shape, rank)
    ranks = (rank,) * len(full) if isinstance(rank, int) else tuple(rank)
    if len(ranks) != len(full) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise AutorankError(f"{method} needs {len(full)} integer rank(s), got {rank!r}")
    for r, f in zip(ranks, full, strict=True):
        if not 1 <= r <= f:
            raise AutorankError(f"{method} rank {list(ranks)} out of range for weight {list(shape)}: "
                                f"each must be in [1, {list(full)}]")
    return attainable_ranks(method, shape, ranks)
