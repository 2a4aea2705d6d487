"""QuIP (the original): incoherence processing + LDLQ adaptive rounding, 2-4 bits.

Paper: Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees",
arXiv 2307.13304. Reference code: Cornell-RelaxML/QuIP `method.py`, `quant.py`, `vector_balance.py`
(`--incoh_processing` = `--pre_gptqH --pre_rescale --pre_proj --qfn b`). Not QuIP# (no Hadamard, no E8).

Per linear, reproduced: H from layer-sequential calibration (in fp64 sums); **rescale**: H /= max|H|,
s = (diag H / diag W^T W)^(1/4) (both clamped >= 1e-8), W <- W diag(s), H <- diag(s)^-1 H diag(s)^-1;
**random orthogonal incoherence**: U (out x out) and V (in x in), each the reference's blocked "butterfly"
(`gen_rand_ortho_butterfly`, its default `pre_proj_extra` 0): n = p1 p2 from n's prime factors taken
alternately, an input permutation, then p2 independent SO(p1) blocks and p1 independent SO(p2) blocks
(`Butterfly`), then an output permutation; H <- H n / tr H + 1e-2 I, W <- U W V^T, H <- V H V^T;
**GPTQ damping** (dead columns, 0.01 mean diag); **qfn 'b'**: scale = 2.4 RMS(W), W~ = clamp(((W / scale) + 1) / 2 * maxq, 0, maxq) rounded by
**LDLQ** (H = L D L^T with L unit lower triangular from Cholesky; columns in reverse, each rounded with the
error feedback (W~ - W^)_{k+1:} L_{k+1:,k}, clamp to [0, maxq]; then `npasses` greedy passes, default
0 as in the reference's `--npasses`); map back ((q / maxq) * 2 - 1) * scale;
undo: W^ <- U^T W^ V, then / s.

Approximated: the reference draws its blocks with `scipy.stats.special_ortho_group` (and 2 x 2 blocks as
rotations by a uniform angle); we draw Haar-random SO(p) blocks by QR of a Gaussian (signs fixed, one column
negated where the determinant is -1), the same distribution, from a seeded torch generator.
Storage: b-bit codes (packed), one fp32 scale, s (in), and the blocks and permutations of U and V, which
inference applies around the dequantized matmul (y = U^T(W^ (V (x / s)))); their bytes are counted.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.calib import Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.pack import pack, packed_len, unpack
from llamalab.quant.quantizer import single_thread


def butterfly_factors(n: int) -> tuple[int, int]:
    """The reference's two factor sizes of n: the products of its prime factors (ascending) at even and at
    odd positions (576 -> 24 x 24, 1536 -> 32 x 48, 192 -> 24 x 8)."""
    primes, m, d = [], n, 2
    while d * d <= m:
        while m % d == 0:
            primes.append(d)
            m //= d
        d += 1
    if m > 1:
        primes.append(m)
    return math.prod(primes[0::2]), math.prod(primes[1::2])


def haar_special_orthogonal(count: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """`count` independent Haar-random matrices of SO(p), (count, p, p): QR of a Gaussian with the signs of
    R's diagonal moved into Q (Haar on O(p)), then one column negated where the determinant is -1."""
    q, r = torch.linalg.qr(torch.randn(count, p, p, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[:, :, 0] *= torch.sign(torch.linalg.det(q))[:, None]
    return q


@dataclass
class Butterfly:
    """The reference's random orthogonal "butterfly" M = P_out S_2 S_1 P_in of size n = p1 p2 (its default
    `pre_proj_extra` 0: blocked, with permutations): a vector permuted by `perm_in`, viewed as a p1 x p2
    matrix X (row-major), then each column b of X multiplied by its own SO(p1) matrix `first[b]`, each row a
    by its own SO(p2) matrix `second[a]`, and the result permuted by `perm_out` ((P v)_i = v[perm[i]])."""

    first: torch.Tensor  # (p2, p1, p1)
    second: torch.Tensor  # (p1, p2, p2)
    perm_in: torch.Tensor  # (n,)
    perm_out: torch.Tensor  # (n,)

    @classmethod
    def random(cls, n: int, gen: torch.Generator) -> Butterfly:
        p1, p2 = butterfly_factors(n)
        first, second = haar_special_orthogonal(p2, p1, gen), haar_special_orthogonal(p1, p2, gen)
        return cls(first, second, torch.randperm(n, generator=gen), torch.randperm(n, generator=gen))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """M v for every row v of x (that is, x @ M^T)."""
        p1, p2 = self.second.shape[0], self.first.shape[0]
        z = x.index_select(-1, self.perm_in.long()).reshape(*x.shape[:-1], p1, p2)
        z = torch.einsum("bij,...jb->...ib", self.first.to(x.dtype), z)
        z = torch.einsum("aij,...aj->...ai", self.second.to(x.dtype), z)
        return z.reshape(x.shape).index_select(-1, self.perm_out.long())

    def apply_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """M^T v for every row v of x (that is, x @ M): each step of `apply` undone in reverse."""
        p1, p2 = self.second.shape[0], self.first.shape[0]
        z = x.index_select(-1, torch.argsort(self.perm_out.long())).reshape(*x.shape[:-1], p1, p2)
        z = torch.einsum("aji,...aj->...ai", self.second.to(x.dtype), z)
        z = torch.einsum("bji,...jb->...ib", self.first.to(x.dtype), z)
        return z.reshape(x.shape).index_select(-1, torch.argsort(self.perm_in.long()))

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        n = self.perm_in.numel()
        return self.apply(torch.eye(n, dtype=dtype)).T


def ldlq(W: torch.Tensor, H: torch.Tensor, maxq: int, npasses: int = 0) -> torch.Tensor:
    """QuIP's LDLQ rounding of W (rows, cols) already mapped to the integer grid [0, maxq]: columns in
    reverse order, each rounded with feedback from the later columns' rounding errors through the unit lower
    triangular L of H = L D L^T. Then up to `npasses` greedy passes (the reference's `round_ldl`): each
    column, in reverse, re-rounded to the value that minimises the proxy loss given all the others,
    clamped after each pass, stopping early at a fixed point."""
    L = torch.linalg.cholesky(H.double())
    L = (L @ torch.diag(1 / torch.diag(L))).float()
    L = L - torch.eye(L.shape[0])
    Wh = torch.zeros_like(W)
    with single_thread():
        for k in reversed(range(W.shape[1])):
            fb = (W[:, k + 1 :] - Wh[:, k + 1 :]) @ L[k + 1 :, k]
            Wh[:, k] = torch.clamp(torch.floor(W[:, k] + fb + 0.5), 0, maxq)
        if npasses:
            Hn = H.float() / H.diagonal().max()
            wr, s = Wh.clone(), Wh - W
            for _ in range(npasses):
                for k in reversed(range(W.shape[1])):
                    eps = wr[:, k] - torch.round(wr[:, k] - (s @ Hn[:, k]) / Hn[k, k])
                    wr[:, k] -= eps
                    s[:, k] -= eps
                wr = wr.clamp(0, maxq)
                if torch.equal(wr, Wh):
                    break
                Wh = wr.clone()
            Wh = wr
    return Wh


def quip_quantize(
    W: torch.Tensor, H: torch.Tensor, bits: int, seed: int, percdamp: float = 0.01, npasses: int = 0
) -> dict[str, Any]:
    """The full per-linear QuIP pipeline; returns codes and everything needed to invert the transforms."""
    W = W.detach().float().clone()
    H = H.double().clone()
    rows, cols = W.shape
    H /= H.abs().max()
    diagH = torch.diag(H).clamp(min=1e-8)
    diagW2 = (W.double() ** 2).sum(0).clamp(min=1e-8)
    s = (diagH / diagW2).pow(0.25).clamp(min=1e-8)
    W = W * s.float()[None, :]
    H = H / s[None, :] / s[:, None]
    gen = torch.Generator().manual_seed(seed)
    Ub, Vb = Butterfly.random(rows, gen), Butterfly.random(cols, gen)
    U, V = Ub.dense(), Vb.dense()
    H = H * (cols / (torch.trace(H) + 1e-8)) + 1e-2 * torch.eye(cols, dtype=torch.float64)
    W = (U @ W.double() @ V.T).float()
    H = (V @ H @ V.T).float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    maxq = 2**bits - 1
    scale = 2.4 * W.square().mean().sqrt()
    Wt = torch.clamp(((W / scale) + 1) / 2 * maxq, 0, maxq)
    codes = ldlq(Wt, H, maxq, npasses)
    return {
        "codes": codes.to(torch.uint8), "scale": float(scale), "rescale": s.float(),
        "U": Ub, "V": Vb,
    }  # fmt: skip


@register_format
class QuIPLinear(QuantLinear):
    """QuIP storage: packed codes on a uniform [-scale, scale] grid in the rotated basis, plus the
    rescaling vector and the butterflies U (outputs) and V (inputs): their blocks and permutations."""

    format = "quip"
    LAYOUT = 2  # 1: one Kronecker product and one permutation per side (before the reference's blocks)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int = 2, layout: int = 1
    ) -> None:
        if layout != self.LAYOUT:
            raise LlamalabError(
                "this QuIP checkpoint was written by an older llamalab (one Kronecker product per side, not "
                "the reference's blocked butterflies): quantize the model again"
            )
        super().__init__(in_features, out_features, bias)
        self.bits = bits
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(1))
        self.register_buffer("rescale", torch.zeros(in_features))
        for side, n in (("u", out_features), ("v", in_features)):
            p1, p2 = butterfly_factors(n)
            self.register_buffer(f"{side}_first", torch.zeros(p2, p1, p1))
            self.register_buffer(f"{side}_second", torch.zeros(p1, p2, p2))
            self.register_buffer(f"{side}_perm_in", torch.zeros(n, dtype=torch.int32))
            self.register_buffer(f"{side}_perm_out", torch.zeros(n, dtype=torch.int32))

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "layout": self.LAYOUT}

    @classmethod
    def from_result(cls, r: dict[str, Any], bits: int, bias: torch.Tensor | None) -> QuIPLinear:
        out_f, in_f = r["codes"].shape
        m = cls(in_f, out_f, bias is not None, bits, cls.LAYOUT)
        m.qweight = pack(r["codes"], bits)
        m.scale = torch.tensor([r["scale"]])
        m.rescale = r["rescale"]
        for side in ("u", "v"):
            b: Butterfly = r[side.upper()]
            setattr(m, f"{side}_first", b.first.float())
            setattr(m, f"{side}_second", b.second.float())
            setattr(m, f"{side}_perm_in", b.perm_in.to(torch.int32))
            setattr(m, f"{side}_perm_out", b.perm_out.to(torch.int32))
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def butterfly(self, side: str) -> Butterfly:
        get = lambda name: getattr(self, f"{side}_{name}")  # noqa: E731
        return Butterfly(get("first").float(), get("second").float(), get("perm_in"), get("perm_out"))

    def rotated_weight(self) -> torch.Tensor:
        maxq = 2**self.bits - 1
        q = unpack(self.qweight, self.bits, self.in_features).float()
        return ((q / maxq) * 2 - 1) * self.scale.float()

    def dequantize(self) -> torch.Tensor:
        U, V = self.butterfly("u").dense(torch.float32), self.butterfly("v").dense(torch.float32)
        return (U.T @ self.rotated_weight() @ V) / self.rescale.float()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x W^T with W = U^T W~ V / s: rows through V, the rotated weight, then U^T.
        dt = x.dtype
        h = self.butterfly("v").apply(x.float() / self.rescale.float())
        y = self.butterfly("u").apply_transposed(F.linear(h, self.rotated_weight()))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dt)


@register_method
class QuIP(Method):
    name = "quip"
    revision = 2  # the reference's blocked butterflies
    kinds = {"hessian"}
    bit_range = (2, 4)
    default_bits = 2
    group_sizes_allowed = False
    seeded = True

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"seed": int(options.pop("seed", 0)), "percdamp": float(options.pop("percdamp", 0.01)),
               "npasses": int(options.pop("npasses", 0)),
               "true_sequential": bool(options.pop("true_sequential", False))}  # fmt: skip
        if out["npasses"] < 0:
            raise LlamalabError(f"quip npasses must be 0 or more, not {out['npasses']}")
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> QuIPLinear:
        seed = self.options["seed"] * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003
        o = self.options
        r = quip_quantize(
            linear.weight, stats.xtx / stats.n, int(self.bits), seed, o["percdamp"], o["npasses"]
        )
        return QuIPLinear.from_result(r, int(self.bits), linear.bias)
