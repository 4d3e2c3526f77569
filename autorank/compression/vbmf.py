"""EVBMF: the empirical variational Bayesian matrix factorisation estimate of a matrix's rank.

EVBMF has a global analytic solution (Nakajima, Tomioka, Sugiyama & Babacan, JMLR 2013): the noise
variance is the minimiser of a one-dimensional objective and the estimated rank is the number of
singular values above a closed-form threshold. No maintained library ships it, so it is implemented
here and tested against synthetic low-rank matrices with known rank. The per-method rank rules built
on it are in `methods.py`; MUSCO's weakening is `weaken`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from threadpoolctl import ThreadpoolController

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


def guarded_rank(matrix: torch.Tensor) -> int:
    """EVBMF rank, with the known failure (rank 0: the noise estimate swallowed every component)
    replaced by the full rank, so that such a layer is left uncompressed instead of destroyed."""
    rank = evbmf(matrix).rank
    return rank if rank > 0 else min(matrix.shape)


def weaken(full: int, estimate: int, weakening: float) -> int:
    """MUSCO weakening R - w (R - r), clamped to [1, R]."""
    return int(min(max(round(full - weakening * (full - estimate)), 1), full))


def vbmf_ranks(weight: torch.Tensor, weakening: float = 1.0) -> tuple[int, int]:
    """Tucker-2 ranks (R1, R2) of a conv weight (T, C, kh, kw), in chain order C->R1->R2->T:
    R1 from the mode-1 unfolding, R2 from the mode-0 unfolding. For a 2-D weight: (r, r)."""
    if weight.ndim == 2:
        r = weaken(min(weight.shape), guarded_rank(weight), weakening)
        return r, r
    T, C = weight.shape[:2]
    mode0 = weight.reshape(T, -1)
    mode1 = weight.transpose(0, 1).reshape(C, -1)
    return weaken(C, guarded_rank(mode1), weakening), weaken(T, guarded_rank(mode0), weakening)
