"""EVBMF against matrices of known rank; rank rules, weakening, ratios and rank validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from autorank.compression import evbmf, vbmf_ranks
from autorank.compression.ranks import full_ranks, method_params, resolve_rank, vbmf_method_ranks
from autorank.compression.ranks import ratio_ranks
from autorank.compression.vbmf import weaken
from autorank.errors import AutorankError


def low_rank_plus_noise(L: int, M: int, rank: int, sigma: float, seed: int) -> np.ndarray:
    """Rank-`rank` signal whose singular values sit 2-6x above the noise edge sigma (sqrt L + sqrt M)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((L, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((M, rank)))
    edge = sigma * (math.sqrt(L) + math.sqrt(M))
    signal = (u * np.linspace(6 * edge, 2 * edge, rank)) @ v.T
    return signal + sigma * rng.standard_normal((L, M))


@pytest.mark.parametrize("L,M,rank", [(50, 100, 5), (100, 100, 10), (64, 576, 12), (300, 40, 7), (16, 144, 3)])
@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0])
def test_evbmf_recovers_the_true_rank(L, M, rank, sigma):
    result = evbmf(low_rank_plus_noise(L, M, rank, sigma, seed=L + M + rank))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.15)  # the noise level is estimated too
    assert np.all(result.values < result.singular_values[:rank])  # posterior values are shrunk


def test_evbmf_with_known_noise_and_tensor_input():
    matrix = torch.from_numpy(low_rank_plus_noise(40, 80, 4, 0.5, seed=3))
    assert evbmf(matrix, sigma2=0.25).rank == 4
    assert evbmf(matrix.T).rank == 4  # orientation does not matter


def test_pure_noise_has_rank_zero_and_the_guard_keeps_the_layer():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((32, 288))
    assert evbmf(noise).rank == 0
    weight = torch.from_numpy(noise).float().reshape(32, 32, 3, 3)
    assert vbmf_ranks(weight) == (32, 32)  # rank 0 would destroy the layer: fall back to full


def test_weakening_interpolates_between_full_and_evbmf():
    assert weaken(64, 10, 1.0) == 10
    assert weaken(64, 10, 0.0) == 64
    assert weaken(64, 10, 0.5) == 37
    assert weaken(64, 0, 1.0) == 1  # clamped to [1, full]


def test_method_rank_rules_on_a_structured_kernel():
    g = torch.Generator().manual_seed(0)
    T, C, k = 48, 32, 3
    core = torch.randn(6, 4, k, k, generator=g)
    kernel = torch.einsum("oirs,to,ci->tcrs", core, torch.randn(T, 6, generator=g), torch.randn(C, 4, generator=g))
    kernel = kernel + 0.01 * torch.randn(kernel.shape, generator=g)
    r1, r2 = vbmf_ranks(kernel)
    assert (r1, r2) == (4, 6)  # input-side (mode-1) and output-side (mode-0) ranks, chain order
    tt = vbmf_method_ranks("tt", kernel)
    assert (tt[0], tt[2]) == (r1, r2)  # TT's outer unfoldings are Tucker-2's
    (cp,) = vbmf_method_ranks("cp", kernel)
    # CP gets the parameter budget of Tucker-2 at its EVBMF ranks
    assert cp == round(method_params("tucker2", kernel.shape, (r1, r2)) / (T + C + 2 * k))
    assert vbmf_method_ranks("tucker2", kernel, weakening=0.5) == (weaken(C, 4, 0.5), weaken(T, 6, 0.5))


@pytest.mark.parametrize("method,shape", [("cp", (64, 32, 3, 3)), ("tucker2", (64, 32, 3, 3)),
                                          ("tt", (64, 32, 3, 3)), ("svd", (10, 64)), ("tucker2", (16, 16, 1, 1))])
@pytest.mark.parametrize("ratio", [0.1, 0.33, 0.7])
def test_ratio_hits_the_parameter_target(method, shape, ratio):
    target = ratio * math.prod(shape)
    ranks = ratio_ranks(method, shape, ratio)
    got = method_params(method, shape, ranks)
    full = full_ranks(method, shape)
    assert all(1 <= r <= f for r, f in zip(ranks, full, strict=True))
    if len(full) == 1:  # one rank: the nearest achievable count
        assert abs(got - target) <= method_params(method, shape, (1,)) / 2
    assert abs(got - target) / target < 0.25 or ranks == tuple(1 for _ in ranks)


def test_ratio_is_close_for_large_layers():
    shape = (256, 256, 3, 3)
    for method in ("cp", "tucker2", "tt"):
        got = method_params(method, shape, ratio_ranks(method, shape, 0.25))
        assert abs(got - 0.25 * math.prod(shape)) / (0.25 * math.prod(shape)) < 0.02


def test_resolve_rank_validates_before_computing():
    conv = nn.Conv2d(16, 32, 3)
    assert resolve_rank("tucker2", conv, [4, 8]) == (4, 8)
    assert resolve_rank("tt", conv, 5) == (5, 5, 5)
    assert resolve_rank("tucker2", conv, "vbmf:0") == (16, 32)  # w = 0: no compression
    assert resolve_rank("cp", conv, "vbmf:0") == (round(method_params("tucker2", (32, 16, 3, 3), (16, 32)) / 54),)
    for bad in ([17, 4], [0, 4], [4], "vbmf:2", "half", 0.0, 1.5, True, [4.0, 2]):
        with pytest.raises(AutorankError):
            resolve_rank("tucker2", conv, bad)
    with pytest.raises(AutorankError, match="out of range"):
        resolve_rank("cp", conv, 10_000)


def test_tt_ranks_are_clamped_to_what_tt_svd_returns():
    conv = nn.Conv2d(16, 16, 3, bias=False)
    # r2 <= r1 * kh and r3 <= r2 * kw: (2, 16, 16) becomes (2, 6, 16)
    assert resolve_rank("tt", conv, [2, 16, 16]) == (2, 6, 16)
    from autorank.compression.methods import decompose_layer
    chain = decompose_layer(conv, "tt", resolve_rank("tt", conv, [2, 16, 16]))
    assert [m.out_channels for m in chain] == [2, 6, 16, 16]


def test_tucker2_ranks_are_clamped_to_what_the_core_can_hold():
    conv = nn.Conv2d(32, 32, 3, bias=False)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight)
    # r1 <= r2 * kh * kw and r2 <= r1 * kh * kw: (2, 32) becomes (2, 18), (32, 1) becomes (9, 1)
    assert resolve_rank("tucker2", conv, [2, 32]) == (2, 18)
    assert resolve_rank("tucker2", conv, [32, 1]) == (9, 1)
    assert resolve_rank("tucker2", nn.Conv2d(32, 32, 1), [4, 12]) == (4, 4)
    from autorank.compression.methods import decompose_layer
    # the clamp loses nothing: the unclamped and clamped chains compute the same function
    x = torch.randn(2, 32, 8, 8)
    wide = decompose_layer(conv, "tucker2", (2, 32))
    clamped = decompose_layer(conv, "tucker2", resolve_rank("tucker2", conv, [2, 32]))
    assert [m.out_channels for m in clamped] == [2, 18, 32]
    with torch.no_grad():
        torch.testing.assert_close(clamped(x), wide(x), rtol=1e-4, atol=1e-4)
