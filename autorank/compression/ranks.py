"""Rank rules: integer ranks for a layer from any rank spec (EVBMF, a retention ratio, integers).

The per-method parts (full ranks, parameter counts, EVBMF rules, what a factoriser can return) come
from the method registry (`methods.py`); here they are combined into what a plan's rank spec means:
- "vbmf" / "vbmf:W": the method's EVBMF rule at MUSCO weakening W (rules in `methods.py`).
- A retention ratio rho picks ranks whose parameter count is closest to rho x the layer's weight count
  (one rank: rounded; several: proportional to the full ranks, best integer rounding).
- Integers: one per rank position (or one for all), within [1, full].
"""

from __future__ import annotations

import math
from itertools import product

import torch
from torch import nn

from autorank.errors import AutorankError

from .methods import decomposition


def full_ranks(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The largest meaningful ranks of method `name` for a weight of `shape` (the exact-reconstruction ranks)."""
    return decomposition(name).full_ranks(shape)


def method_params(name: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Weight parameters of the layer under method `name` (bias excluded); "none" keeps the weight whole."""
    return math.prod(shape) if name == "none" else decomposition(name).params(shape, ranks)


def vbmf_method_ranks(name: str, weight: torch.Tensor, weakening: float = 1.0) -> tuple[int, ...]:
    """EVBMF-derived ranks for method `name` (rules in `methods.py`)."""
    return decomposition(name).evbmf_ranks(weight, weakening)


def attainable_ranks(name: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Clamp ranks to what the decomposition can return, so the chain built from a plan has the
    shapes of the factors and no factor spans directions the kernel does not have."""
    return decomposition(name).attainable(shape, ranks)


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
    quad = method_params(method, shape, full) - _linear_part(shape, full)
    lin = _linear_part(shape, full)
    a = (-lin + math.sqrt(lin * lin + 4 * quad * target)) / (2 * quad)
    base = [a * f for f in full]
    candidates = {
        attainable_ranks(method, shape, tuple(_clamp(math.floor(b) + d, f) for b, d, f in zip(base, delta, full,
                                                                                          strict=True)))
        for delta in product((0, 1), repeat=len(full))
    }
    return min(candidates, key=lambda r: (abs(method_params(method, shape, r) - target), r))


def _linear_part(shape: tuple[int, ...], full: tuple[int, ...]) -> float:
    """The part of params(a * full) that is linear in a: the outer 1x1 convs (C -> first rank, last rank -> T)
    of every multi-rank chain."""
    T, C = shape[:2]
    return C * full[0] + full[-1] * T


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
