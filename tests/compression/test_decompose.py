"""Decompositions into plain conv chains: exactness at full rank, closed-form sizes, stabilised CP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autorank.compression.decompose import balance_cp, decompose_cp
from autorank.compression.methods import build_chain, decompose_layer
from autorank.compression.ranks import full_ranks, method_params
from autorank.compression.decompose import _cp_tensor
from autorank.errors import AutorankError

CONVS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, bias=True),
    dict(in_channels=5, out_channels=4, kernel_size=(3, 5), padding=(1, 2), dilation=(1, 2), bias=False),
    dict(in_channels=4, out_channels=7, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
    dict(in_channels=4, out_channels=6, kernel_size=1, bias=True),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("method", ["cp", "tucker2", "tt"])
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: f"{s['in_channels']}x{s['out_channels']}k{s['kernel_size']}")
def test_full_rank_reproduces_the_conv(method, spec):
    conv = nn.Conv2d(**spec)
    x = torch.randn(2, conv.in_channels, 11, 13)
    ranks = full_ranks(method, tuple(conv.weight.shape))
    chain = decompose_layer(conv, method, ranks)
    with torch.no_grad():
        assert rel_err(chain(x), conv(x)) < 1e-4
    bias = conv.out_channels if conv.bias is not None else 0
    assert n_params(chain) == method_params(method, tuple(conv.weight.shape), ranks) + bias
    assert all(type(m) is nn.Conv2d for m in chain)


def test_svd_full_rank_reproduces_the_linear():
    layer = nn.Linear(20, 7)
    chain = decompose_layer(layer, "svd", (7,))
    x = torch.randn(5, 20)
    with torch.no_grad():
        assert rel_err(chain(x), layer(x)) < 1e-4
    assert n_params(chain) == 7 * (20 + 7) + 7
    assert all(type(m) is nn.Linear for m in chain)


def test_closed_form_parameter_counts():
    T, C, kh, kw = 32, 16, 3, 5
    shape = (T, C, kh, kw)
    assert method_params("cp", shape, (10,)) == 10 * (C + kh + kw + T)
    assert method_params("tucker2", shape, (6, 9)) == C * 6 + 6 * 9 * kh * kw + 9 * T
    assert method_params("tt", shape, (4, 8, 5)) == C * 4 + 4 * kh * 8 + 8 * kw * 5 + 5 * T
    conv = nn.Conv2d(C, T, (kh, kw), bias=False)
    for method, ranks in [("cp", (10,)), ("tucker2", (6, 9)), ("tt", (4, 8, 5))]:
        assert n_params(build_chain(conv, method, ranks)) == method_params(method, shape, ranks)


def test_chain_structure_keeps_stride_padding_dilation():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=True)
    cp = build_chain(conv, "cp", (5,))
    assert [m.kernel_size for m in cp] == [(1, 1), (3, 1), (1, 3), (1, 1)]
    assert [m.groups for m in cp] == [1, 5, 5, 1]
    assert (cp[1].stride, cp[1].padding, cp[1].dilation) == ((2, 1), (2, 0), (2, 1))
    assert (cp[2].stride, cp[2].padding, cp[2].dilation) == ((1, 2), (0, 2), (1, 2))
    assert cp[3].bias is not None and cp[0].bias is None
    tucker = build_chain(conv, "tucker2", (4, 6))
    assert (tucker[1].stride, tucker[1].padding, tucker[1].dilation) == ((2, 2), (2, 2), (2, 2))
    assert [m.out_channels for m in tucker] == [4, 6, 12]
    tt = build_chain(conv, "tt", (3, 7, 5))
    assert [m.out_channels for m in tt] == [3, 7, 5, 12]
    assert [m.kernel_size for m in tt] == [(1, 1), (3, 1), (1, 3), (1, 1)]


def test_low_rank_kernels_are_recovered_at_their_rank():
    g = torch.Generator().manual_seed(1)
    T, C, k = 12, 10, 3
    # CP rank 4 kernel -> CP-ALS (SVD init) at rank 4
    factors = [torch.randn(d, 4, generator=g, dtype=torch.float64) for d in (T, C, k, k)]
    kernel = _cp_tensor(factors).float()
    assert decompose_cp(kernel, 4, stabilize="none").error < 1e-4
    # multilinear rank (5, 3) in the channel modes -> Tucker-2 at ranks (R1=3 input, R2=5 output)
    core = torch.randn(5, 3, k, k, generator=g)
    u_out, u_in = torch.randn(T, 5, generator=g), torch.randn(C, 3, generator=g)
    kernel = torch.einsum("oirs,to,ci->tcrs", core, u_out, u_in)
    conv = nn.Conv2d(C, T, k, padding=1, bias=False)
    conv.weight.data.copy_(kernel)
    x = torch.randn(2, C, 9, 9, generator=g)
    with torch.no_grad():
        assert rel_err(decompose_layer(conv, "tucker2", (3, 5))(x), conv(x)) < 1e-4
        # a truncation below the true rank is not exact
        assert rel_err(decompose_layer(conv, "tucker2", (2, 5))(x), conv(x)) > 1e-2


def test_balancing_keeps_the_tensor_and_equalises_norms():
    g = torch.Generator().manual_seed(2)
    factors = [torch.randn(d, 6, generator=g, dtype=torch.float64) * s for d, s in [(8, 100.0), (5, 0.01), (3, 1), (3, 3)]]
    balanced = balance_cp(factors)
    assert torch.allclose(_cp_tensor(balanced), _cp_tensor(factors), atol=1e-10)
    norms = torch.stack([f.norm(dim=0) for f in balanced])
    assert torch.allclose(norms, norms[0].expand_as(norms))


@pytest.mark.parametrize("stabilize", ["balance", "epc"])
def test_stabilised_cp_is_no_worse_and_less_sensitive(stabilize):
    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(12, 10, 3, 3, generator=g)
    plain = decompose_cp(kernel, 20, stabilize="none", n_iter_max=40)
    stable = decompose_cp(kernel, 20, stabilize=stabilize, n_iter_max=40, epc_iter=20)
    assert stable.error <= plain.error * (1 + 1e-9)
    balanced = decompose_cp(kernel, 20, stabilize="balance", n_iter_max=40)
    assert stable.sensitivity <= balanced.sensitivity * (1 + 1e-9) < plain.sensitivity


def test_method_must_fit_the_layer_type():
    with pytest.raises(AutorankError, match="nn.Conv2d"):
        decompose_layer(nn.Linear(4, 4), "cp", (2,))
    with pytest.raises(AutorankError, match="nn.Linear"):
        decompose_layer(nn.Conv2d(4, 4, 3), "svd", (2,))
    with pytest.raises(AutorankError, match="groups=1"):
        decompose_layer(nn.Conv2d(4, 4, 3, groups=2), "tucker2", (2, 2))
