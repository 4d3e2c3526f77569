"""The decomposition methods, one registry entry each: what they decompose, their chain, their factoriser
and their rank rules.

Everything that depends on the method (the chain's structure, how its factors are computed, the full
ranks, the parameter count, the EVBMF rank rule, the ranks a factoriser can return) is looked up here
by the method's name (`decomposition(name)`), so the rest of the package never switches on it and a new method
is one entry. Rank rules (documented in docs/COMPRESSION.md), with shapes (T, C, kh, kw) or (out, in):
- Tucker-2 (R1, R2), in chain order: R1 = EVBMF rank of the mode-1 (input-channel) unfolding,
  R2 = EVBMF rank of the mode-0 (output-channel) unfolding.
- TT (r1, r2, r3) over (C, kh, kw, T): EVBMF rank of the three TT-SVD unfoldings
  C x (kh kw T), (C kh) x (kw T), (C kh kw) x T — r1 and r3 coincide with Tucker-2's R1, R2.
- CP R: the CP rank with the same parameter count as Tucker-2 at its EVBMF ranks.
- SVD r: EVBMF rank of the weight matrix.
- Weakening (MUSCO, `vbmf.weaken`) applies to each EVBMF rank before the CP rule; every rank is
  clamped to [1, full].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from autorank.errors import AutorankError

from .decompose import _explicit_padding, cp_chain, cp_conv, svd_chain, svd_linear, tt_chain, tt_conv, tucker2_chain, tucker2_conv
from .vbmf import guarded_rank, vbmf_ranks, weaken

Shape = tuple[int, ...]
Ranks = tuple[int, ...]


@dataclass(frozen=True)
class Method:
    """One decomposition method and everything about it that differs from the others."""

    name: str
    layer: type[nn.Module]                                  # what it decomposes: nn.Conv2d or nn.Linear
    chain: Callable[[nn.Module, Ranks], nn.Sequential]      # the chain's structure, weights uninitialised
    factorise: Callable[[nn.Module, Ranks, str, int, int], nn.Sequential]  # (layer, ranks, stabilize, iters, seed)
    full_ranks: Callable[[Shape], Ranks]                    # the exact-reconstruction ranks
    params: Callable[[Shape, Ranks], int]                   # weight parameters of the chain (bias excluded)
    evbmf_ranks: Callable[[torch.Tensor, float], Ranks]     # (weight, weakening) -> EVBMF-derived ranks
    attainable: Callable[[Shape, Ranks], Ranks] = lambda shape, ranks: ranks  # what the factoriser can return
    # the chain's weights, in chain order and as stored (4-D conv kernels, 2-D linear weights), -> the layer's
    # weight: an einsum equation that ONNX (Einsum) and torch read alike; singleton axes are summed away
    recompose: str = field(default="", kw_only=True)


def _clamp(rank: int, full: int) -> int:
    return int(min(max(rank, 1), full))


# ---- Tucker-2: 1x1 (C->R1) -> kh x kw (R1->R2) -> 1x1 (R2->T) ----

def _tucker2_params(shape: Shape, ranks: Ranks) -> int:
    T, C, kh, kw = shape
    r1, r2 = ranks
    return C * r1 + r1 * r2 * kh * kw + r2 * T


def _tucker2_attainable(shape: Shape, ranks: Ranks) -> Ranks:
    """The core (R2, R1, kh, kw) has mode ranks r1 <= r2 kh kw and r2 <= r1 kh kw; a factor wider than
    that is completed from a null space that LAPACK fills differently from run to run (a rank [2, 32]
    3x3 conv fine-tuned to different accuracies in two identical runs)."""
    k = shape[2] * shape[3]
    return (min(ranks[0], ranks[1] * k), min(ranks[1], ranks[0] * k))


def _tucker2_evbmf(weight: torch.Tensor, weakening: float) -> Ranks:
    return _tucker2_attainable(tuple(weight.shape), vbmf_ranks(weight, weakening))


# ---- CP-4: 1x1 (C->R) -> kh x 1 depthwise -> 1 x kw depthwise -> 1x1 (R->T) ----

def _cp_full(shape: Shape) -> Ranks:
    # Trivial upper bound of the CP rank: enumerate all modes but the largest with unit vectors.
    return (math.prod(shape) // max(shape),)


def _cp_evbmf(weight: torch.Tensor, weakening: float) -> Ranks:
    shape = tuple(weight.shape)
    budget = _tucker2_params(shape, _tucker2_evbmf(weight, weakening))
    return (_clamp(round(budget / sum(shape)), _cp_full(shape)[0]),)


# ---- TT over (C, kh, kw, T): 1x1 (C->r1) -> kh x 1 (r1->r2) -> 1 x kw (r2->r3) -> 1x1 (r3->T) ----

def _tt_full(shape: Shape) -> Ranks:
    T, C, kh, kw = shape
    return (min(C, kh * kw * T), min(C * kh, kw * T), min(C * kh * kw, T))


def _tt_params(shape: Shape, ranks: Ranks) -> int:
    T, C, kh, kw = shape
    r1, r2, r3 = ranks
    return C * r1 + r1 * kh * r2 + r2 * kw * r3 + r3 * T


def _tt_attainable(shape: Shape, ranks: Ranks) -> Ranks:
    """TT-SVD returns at most r_k = r_(k-1) n_k channels (C, kh, kw in turn)."""
    T, C, kh, kw = shape
    r1 = min(ranks[0], C)
    r2 = min(ranks[1], r1 * kh)
    return (r1, r2, min(ranks[2], r2 * kw))


def _tt_evbmf(weight: torch.Tensor, weakening: float) -> Ranks:
    shape = tuple(weight.shape)
    T, C, kh, kw = shape
    tensor = weight.permute(1, 2, 3, 0)  # (C, kh, kw, T)
    unfoldings = (tensor.reshape(C, -1), tensor.reshape(C * kh, -1), tensor.reshape(C * kh * kw, -1))
    return _tt_attainable(shape, tuple(weaken(full, guarded_rank(unf), weakening)
                                       for full, unf in zip(_tt_full(shape), unfoldings, strict=True)))


DECOMPOSITIONS: dict[str, Method] = {m.name: m for m in (
    Method("cp", nn.Conv2d, lambda layer, ranks: cp_chain(layer, ranks[0]),
           lambda layer, ranks, stabilize, n_iter_max, seed: cp_conv(layer, ranks[0], stabilize=stabilize,
                                                                     n_iter_max=n_iter_max, seed=seed),
           _cp_full, lambda shape, ranks: ranks[0] * sum(shape), _cp_evbmf, recompose="rcab,rdhe,rfgw,trij->tchw"),
    Method("tucker2", nn.Conv2d, tucker2_chain,
           lambda layer, ranks, stabilize, n_iter_max, seed: tucker2_conv(layer, ranks, n_iter_max=n_iter_max),
           lambda shape: (shape[1], shape[0]), _tucker2_params, _tucker2_evbmf, _tucker2_attainable,
           recompose="pcab,qphw,tqde->tchw"),
    Method("tt", nn.Conv2d, tt_chain, lambda layer, ranks, stabilize, n_iter_max, seed: tt_conv(layer, ranks),
           _tt_full, _tt_params, _tt_evbmf, _tt_attainable, recompose="pcab,qphd,sqew,tsfg->tchw"),
    Method("svd", nn.Linear, lambda layer, ranks: svd_chain(layer, ranks[0]),
           lambda layer, ranks, stabilize, n_iter_max, seed: svd_linear(layer, ranks[0]),
           lambda shape: (min(shape),), lambda shape, ranks: ranks[0] * (shape[0] + shape[1]),
           lambda weight, weakening: (vbmf_ranks(weight, weakening)[0],), recompose="ri,or->oi"),
)}


def decomposition(name: str) -> Method:
    """The registry entry of decomposition method `name`; AutorankError for an unknown one."""
    try:
        return DECOMPOSITIONS[name]
    except KeyError:
        raise AutorankError(f"unknown decomposition method {name!r}") from None


def build_chain(layer: nn.Module, name: str, ranks: Ranks) -> nn.Sequential:
    """The decomposed layer's structure without computing factors (for loading a saved state_dict)."""
    return decomposition(name).chain(layer, ranks)


def decompose_layer(layer: nn.Module, name: str, ranks: Ranks, *, stabilize: str = "epc",
                    n_iter_max: int = 100, seed: int = 0) -> nn.Sequential:
    """Decompose one layer at integer `ranks` (validated by the caller)."""
    return decomposition(name).factorise(layer, ranks, stabilize, n_iter_max, seed)


class Recomposed(nn.Sequential):
    """A chain that the exported file runs recomposed (`LayerPlan.run`): in PyTorch the same modules and
    state_dict as the chain; `method` names its decomposition, for export to compose its kernel."""

    def __init__(self, method: str, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self.method = method

    def extra_repr(self) -> str:
        return f"recomposed {self.method}"


def recomposed(chain: nn.Sequential, name: str) -> nn.Conv2d | nn.Linear:
    """The one layer a chain computes: its kernel composed from the chain's weights (in float64, as they
    are: fake-quantized weights compose on their grid) with the layer's stride, padding and dilation,
    and the chain's last bias. Exact for the chains `build_chain` makes: their inner ops have no bias
    and zero padding, which commute with the 1x1 and separable factors."""
    ops = [m for m in chain if isinstance(m, nn.Conv2d | nn.Linear)]
    last = ops[-1]
    weight = torch.einsum(decomposition(name).recompose, *(m.weight.detach().double() for m in ops))
    kw = {"bias": last.bias is not None, "device": last.weight.device, "dtype": last.weight.dtype}
    if isinstance(last, nn.Linear):
        layer: nn.Conv2d | nn.Linear = nn.Linear(weight.shape[1], weight.shape[0], **kw)
    else:
        axes = range(2)
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                          stride=tuple(math.prod(m.stride[i] for m in ops) for i in axes),
                          padding=tuple(sum(_explicit_padding(m)[i] for m in ops) for i in axes),
                          dilation=tuple(max(m.dilation[i] for m in ops) for i in axes), **kw)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if last.bias is not None:
            layer.bias.copy_(last.bias)
    return layer
