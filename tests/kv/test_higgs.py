"""HIGGS as AQUA-KV uses it (arXiv 2411.17525, 2501.19392): Hadamard matrices of the orders KV widths need,
the Gaussian-optimal grids we compute and ship, and the quantizer's round trip and storage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.kv.parts import hadamard
from llamalab.kv.parts.grids import SHIPPED, gaussian_grid, grid_path, mse, nearest, quadrature
from llamalab.kv.parts.higgs import Higgs, grid_for_bits

# MSE per value of the optimal *scalar* quantizer of N(0, 1) (Lloyd-Max; Max 1960) at 2, 3 and 4 bits: a
# d=2 grid at the same bits must do at least as well.
SCALAR_MSE = {2.0: 0.1175, 3.0: 0.03454, 4.0: 0.009497}


@pytest.mark.parametrize("g", [2, 12, 16, 20, 24, 192, 320, 1024])
def test_hadamard_is_orthogonal_up_to_g_and_the_fast_transform_is_its_product(g):
    h = hadamard.matrix(g)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, g * torch.eye(g, dtype=torch.float64))
    x = torch.randn(5, g, dtype=torch.float64, generator=torch.Generator().manual_seed(g))
    assert torch.allclose(hadamard.transform(x), x @ h.T)
    assert torch.allclose(hadamard.transform(hadamard.transform(x), transpose=True) / g, x)


def test_an_order_without_a_hadamard_matrix_fails_with_one_line():
    assert not hadamard.is_hadamard_order(28)
    with pytest.raises(LlamalabError, match="no Hadamard transform of order 28"):
        hadamard.factors(28)


@pytest.mark.parametrize("d, n", SHIPPED)
def test_shipped_grids_are_gaussian_centroids_and_beat_the_scalar_quantizer(d, n):
    data = json.loads(grid_path(d, n).read_text())
    assert (data["d"], data["n"]) == (d, n)
    grid = gaussian_grid(d, n).double()
    assert grid.shape == (n, d)
    points, mass = quadrature(d, 0.025)
    err = mse(grid, points, mass)
    bits = math.log2(n) / d
    if bits in SCALAR_MSE:
        assert err <= SCALAR_MSE[bits]
    # Lloyd's fixed point: every point is the Gaussian mean of its own Voronoi cell (far cells, with little
    # mass, are where the quadrature is coarsest)
    idx = nearest(points, grid)
    w = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, mass)
    centre = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx, points * mass[:, None]) / w[:, None]
    assert float((centre - grid).norm(dim=1).max()) < 0.05


def test_a_missing_grid_and_unsupported_bits_fail_with_one_line():
    with pytest.raises(LlamalabError, match="no Gaussian grid with d=3, n=8; available"):
        gaussian_grid(3, 8)
    with pytest.raises(LlamalabError, match="2.3 bits per value is not a grid"):
        grid_for_bits(2.3)
    assert grid_for_bits(2.5) == 32 and grid_for_bits(4.0) == 256


@pytest.mark.parametrize("n, bits", [(16, 2.0), (256, 4.0)])
def test_quantizer_round_trip_error_is_the_grids_and_storage_is_packed(n, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 192, generator=g) * torch.linspace(0.1, 4.0, 192)  # uneven channels, as KV
    q = Higgs(192, 192, 2, n)
    codes, scales = q.quantize(x)
    assert codes.dtype == torch.uint8 and codes.shape == (2000, 192 // 2 * int(bits * 2) // 8)
    assert scales.dtype == torch.float16 and torch.allclose(
        scales.float(), x.norm(dim=1, keepdim=True), rtol=1e-3
    )
    assert q.bits_per_value == pytest.approx(bits + 16 / 192)
    back = q.dequantize(codes, scales)
    rel = float(((back - x) ** 2).sum() / (x**2).sum())
    # after the rotation coordinates are ~N(0, 1): the relative error is the grid's MSE per dimension
    points, mass = quadrature(2, 0.025)
    assert rel == pytest.approx(mse(gaussian_grid(2, n).double(), points, mass), rel=0.1)
    zero = torch.zeros(3, 192)
    assert torch.equal(q.quantize_dequantize(zero), zero)  # a zero vector: no 0/0
