"""Hadamard transforms of any order m * 2^k with m in {1, 12, 20}, for HIGGS-style rotation of KV vectors.

HIGGS (arXiv 2411.17525, as used by AQUA-KV, arXiv 2501.19392) multiplies each group of g values by an
unnormalised Hadamard matrix H (entries +-1, H H^T = g I) so that, divided by the group's L2 norm, its
coordinates are close to N(0, 1). The reference code calls the CUDA `fast_hadamard_transform`, which needs g
to be a power of two and pads the token vector up to 1024. A KV width is often not a power of two (SmolLM2:
3 heads x 64 = 192), and padding 192 to 256 would store a third more codes, so the matrix here is a Kronecker
product H_m (x) H_2^a (x) H_2^b ... with H_m a Paley matrix (m = 12 or 20) or 1: 192 = 12 x 16, 320 = 20 x 16.

The transform is applied factor by factor (a matmul per factor along a reshaped axis), so its cost is
g * (sum of the factors) multiply-adds per vector instead of g^2.
"""

from __future__ import annotations

import functools

import torch

from llamalab.errors import LlamalabError

_PALEY_PRIMES = {12: 11, 20: 19}  # m = q + 1 with q prime, q = 3 (mod 4): Paley's first construction
_MAX_FACTOR = 64  # power-of-two factors are split into pieces of at most this size


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


@functools.cache
def paley(m: int) -> torch.Tensor:
    """The Paley-I Hadamard matrix of order m = q + 1 (q prime, q = 3 mod 4), as float64."""
    q = _PALEY_PRIMES[m]
    jac = torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return torch.eye(m, dtype=torch.float64) + s


@functools.cache
def sylvester(p: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order p = 2^k (symmetric), as float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factors(g: int) -> list[int]:
    """Orders of the Kronecker factors of a Hadamard matrix of order g, or an error naming g."""
    for m in (1, 12, 20):
        if g % m == 0 and (g // m) & (g // m - 1) == 0:
            out = [] if m == 1 else [m]
            p = g // m
            while p > 1:
                piece = min(p, _MAX_FACTOR)
                out.append(piece)
                p //= piece
            return out or [1]
    raise LlamalabError(
        f"no Hadamard transform of order {g}: the group size must be 2^k, 12 x 2^k or 20 x 2^k"
    )


def is_hadamard_order(g: int) -> bool:
    try:
        factors(g)
    except LlamalabError:
        return False
    return True


@functools.cache
def _factor_matrix(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = paley(m) if m in _PALEY_PRIMES else sylvester(m)
    return h.to(dtype=dtype, device=device)


def matrix(g: int) -> torch.Tensor:
    """The full (g, g) matrix as float64: the Kronecker product of `factors(g)` (for tests and references)."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for m in factors(g):
        out = torch.kron(out, paley(m) if m in _PALEY_PRIMES else sylvester(m))
    return out


def transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """H x (or H^T x) for every vector along the last dimension of `x`, unnormalised (H H^T = g I), computed
    factor by factor. H^T x / g inverts H x."""
    g = x.shape[-1]
    fs = factors(g)
    lead = x.shape[:-1]
    y = x.reshape(-1, *fs)  # (N, f1, f2, ...): the first factor is the outermost index
    for axis, m in enumerate(fs, start=1):
        if m == 1:
            continue
        h = _factor_matrix(m, x.dtype, str(x.device))
        h = h.T if transpose else h
        y = torch.movedim(torch.movedim(y, axis, -1) @ h.T, -1, axis)
    return y.reshape(*lead, g)
