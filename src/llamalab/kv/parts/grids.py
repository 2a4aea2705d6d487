"""Gaussian-optimal vector-quantization grids ("EDEN" grids in HIGGS, arXiv 2411.17525): n points in R^d
that minimise E ||x - nearest(x)||^2 for x ~ N(0, I_d). After HIGGS' Hadamard rotation and norm scaling a
KV group's coordinates are about N(0, 1), so quantizing d of them at a time to the nearest of these points
costs log2(n)/d bits per value.

We compute the grids ourselves (AQUA-KV ships its own as pickled files): Lloyd's algorithm on a deterministic
quadrature of the Gaussian (a fine square lattice of points over [-R, R]^d weighted by the density; d <= 2),
from several seeded k-means++ starts, keeping the best. That is the same fixed point the reference generator
(`aquakv/grid_generator.py`, stochastic Lloyd on fresh samples) approaches, without sampling noise. The
results ship as JSON in `grid_data/` (`python -m llamalab.kv.parts.grids 2x64` rewrites one, minutes to tens of
minutes on one core) and `tests/kv/test_higgs.py` checks them: the centroid condition holds and each grid's
error is at most the optimal scalar (Lloyd-Max) quantizer's at the same bits. A fixed point on a discrete
quadrature can sit a little off the continuous one (1-D Lloyd from a lopsided start stalls about 0.04 away),
hence several starts and the check of the result rather than trust in the iteration.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import torch

from llamalab.errors import LlamalabError

GRID_DIR = Path(__file__).parent / "grid_data"
SHIPPED = [(2, 16), (2, 32), (2, 64), (2, 256)]  # 2, 2.5, 3 and 4 bits per value


def grid_path(d: int, n: int) -> Path:
    return GRID_DIR / f"gaussian_d{d}_n{n}.json"


@functools.cache
def gaussian_grid(d: int, n: int) -> torch.Tensor:
    """The shipped (n, d) fp32 grid, or a one-line error listing the ones that exist."""
    path = grid_path(d, n)
    if not path.is_file():
        have = ", ".join(f"d={a} n={b} ({math.log2(b) / a:g} bits)" for a, b in SHIPPED)
        raise LlamalabError(f"no Gaussian grid with d={d}, n={n}; available: {have}")
    data = json.loads(path.read_text())
    return torch.tensor(data["points"], dtype=torch.float32)


def quadrature(d: int, step: float, radius: float = 5.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a square lattice over [-radius, radius]^d and their N(0, I) probability masses (fp64)."""
    axis = torch.arange(-radius, radius + step / 2, step, dtype=torch.float64)
    mass = torch.exp(-0.5 * axis**2) / math.sqrt(2 * math.pi) * step
    mass = mass / mass.sum()
    if d == 1:
        return axis[:, None], mass
    if d == 2:
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack([gx.flatten(), gy.flatten()], 1), (mass[:, None] * mass[None, :]).flatten()
    raise LlamalabError(f"quadrature grids are implemented for d <= 2, not d={d}")


def nearest(x: torch.Tensor, grid: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest grid point for each row of x: argmax 2 x.g - |g|^2 (as the reference does)."""
    g2 = (grid * grid).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = (2 * x[s : s + chunk] @ grid.T - g2).argmax(1)
    return out


def mse(grid: torch.Tensor, points: torch.Tensor, mass: torch.Tensor) -> float:
    """Mean squared error per dimension of quantizing N(0, I) to `grid` (by quadrature)."""
    idx = nearest(points, grid.to(points.dtype))
    err = ((points - grid.to(points.dtype)[idx]) ** 2).sum(1)
    return float((err * mass).sum()) / points.shape[1]


def lloyd(
    d: int, n: int, seed: int = 0, steps: tuple[float, ...] = (0.05, 0.0125), iters: int = 4000
) -> torch.Tensor:
    """One Lloyd run from a seeded k-means++ start: each point moves to the Gaussian centroid of its Voronoi
    cell, on a coarse quadrature first and then on finer ones, until no quadrature point changes cell."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(20000, d, generator=gen, dtype=torch.float64)
    grid = sample[torch.randint(0, len(sample), (1,), generator=gen)]
    while len(grid) < n:  # k-means++: next point drawn in proportion to its squared distance
        dist = torch.cdist(sample, grid).min(1).values ** 2
        pick = torch.multinomial(dist / dist.sum(), 1, generator=gen)
        grid = torch.cat([grid, sample[pick]])
    for step in steps:
        points, mass = quadrature(d, step)
        last = None
        for _ in range(iters):
            idx = nearest(points, grid)
            if last is not None and torch.equal(idx, last):
                break  # a fixed point on this quadrature
            last = idx
            w = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, mass)
            s = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx, points * mass[:, None])
            grid = torch.where(w[:, None] > 0, s / w.clamp(min=1e-300)[:, None], grid)
    return grid


def best_grid(d: int, n: int, restarts: int = 4) -> tuple[torch.Tensor, float]:
    points, mass = quadrature(d, 0.0125)
    best, best_mse = None, math.inf
    for seed in range(restarts):
        grid = lloyd(d, n, seed)
        err = mse(grid, points, mass)
        if err < best_mse:
            best, best_mse = grid, err
    # A canonical (lexicographic) order, so that regenerating gives an identical file.
    order = sorted(range(n), key=lambda i: tuple(round(float(v), 6) for v in best[i]))
    return best[order], best_mse


def main(argv: list[str]) -> None:
    """Regenerate the shipped grids (or the `dxn` pairs given, e.g. `2x64`) into `grid_data/`."""
    todo = [tuple(map(int, a.split("x"))) for a in argv] or SHIPPED
    GRID_DIR.mkdir(exist_ok=True)
    for d, n in todo:
        grid, err = best_grid(d, n)
        body = {
            "d": d,
            "n": n,
            "bits_per_value": math.log2(n) / d,
            "mse_per_dim": err,
            "method": "Lloyd on a 0.0125-step Gaussian quadrature over [-5.5, 5.5]^d, best of 4 k-means++ "
            "starts (seeds 0-3); llamalab.kv.parts.grids",
            "points": [[round(float(v), 7) for v in p] for p in grid],
        }
        grid_path(d, n).write_text(json.dumps(body, indent=1) + "\n")
        print(f"d={d} n={n}: mse/dim {err:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
