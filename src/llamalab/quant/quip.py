"""QuIP (the original): incoherence processing + LDLQ adaptive rounding, 2-4 bits.

Paper: Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees",
arXiv 2307.13304. Reference code: Cornell-RelaxML/QuIP `method.py`, `quant.py`, `vector_balance.py`
(`--incoh_processing` = `--pre_gptqH --pre_rescale --pre_proj --qfn b`). Not QuIP# (no Hadamard, no E8).

Per linear, reproduced: H from layer-sequential calibration (in fp64 sums); **rescale**: H /= max|H|,
s = (diag H / diag W^T W)^(1/4) (both clamped >= 1e-8), W <- W diag(s), H <- diag(s)^-1 H diag(s)^-1;
**random orthogonal incoherence**: U (out x out) and V (in x in), each a seeded random permutation
followed by a Kronecker product of two Haar-random orthogonal factors (n = n1 x n2, n1 the largest divisor
<= sqrt n), H <- H n / tr H + 1e-2 I, W <- U W V^T, H <- V H V^T; **GPTQ damping** (dead columns, 0.01 mean
diag); **qfn 'b'**: scale = 2.4 RMS(W), W~ = clamp(((W / scale) + 1) / 2 * maxq, 0, maxq) rounded by
**LDLQ** (H = L D L^T with L unit lower triangular from Cholesky; columns in reverse, each rounded with the
error feedback (W~ - W^)_{k+1:} L_{k+1:,k}, clamp to [0, maxq]); map back ((q / maxq) * 2 - 1) * scale;
undo: W^ <- U^T W^ V, then / s.

Approximated: the reference's two-factor "butterfly" construction draws its factors with
`scipy.stats.special_ortho_group`; we draw Haar-random orthogonal factors by QR of a Gaussian (sign-fixed),
which is the same distribution over O(n) (up to the determinant sign), with a seeded torch generator.
Storage: b-bit codes (packed), one fp32 scale, s (in), and the factors and permutations of U and V, which
inference applies as two small Kronecker matmuls around the dequantized matmul
(y = (((x / s) V^T) W^^T) U); their bytes are counted.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.calib import Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.pack import pack, packed_len, unpack
from llamalab.quant.quantizer import single_thread


def kron_factors(n: int) -> tuple[int, int]:
    n1 = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return n1, n // n1


def haar_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_ortho(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, perm) of the orthogonal matrix V = (A kron B) P, with (P v)_i = v[perm[i]]."""
    n1, n2 = kron_factors(n)
    perm = torch.randperm(n, generator=gen)
    return haar_orthogonal(n1, gen), haar_orthogonal(n2, gen), perm


def ortho_dense(A: torch.Tensor, B: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.kron(A, B)[:, torch.argsort(perm)]


def apply_vt(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x @ V^T for V = (A kron B) P, without forming V: permute, then vec(A X B^T) per row."""
    z = x.index_select(-1, perm)
    Z = z.reshape(*z.shape[:-1], A.shape[0], B.shape[0])
    return (A @ Z @ B.T).reshape(x.shape)


def apply_u(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
    """x @ U for U = (A kron B) P: vec(A^T X B) per row, then un-permute."""
    X = x.reshape(*x.shape[:-1], A.shape[0], B.shape[0])
    return (A.T @ X @ B).reshape(x.shape).index_select(-1, inv_perm)


def ldlq(W: torch.Tensor, H: torch.Tensor, maxq: int) -> torch.Tensor:
    """QuIP's LDLQ rounding of W (rows, cols) already mapped to the integer grid [0, maxq]: columns in
    reverse order, each rounded with feedback from the later columns' rounding errors through the unit lower
    triangular L of H = L D L^T."""
    L = torch.linalg.cholesky(H.double())
    L = (L @ torch.diag(1 / torch.diag(L))).float()
    L = L - torch.eye(L.shape[0])
    Wh = torch.zeros_like(W)
    with single_thread():
        for k in reversed(range(W.shape[1])):
            fb = (W[:, k + 1 :] - Wh[:, k + 1 :]) @ L[k + 1 :, k]
            Wh[:, k] = torch.clamp(torch.floor(W[:, k] + fb + 0.5), 0, maxq)
    return Wh


def quip_quantize(
    W: torch.Tensor, H: torch.Tensor, bits: int, seed: int, percdamp: float = 0.01
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
    Ua, Ub, Up = random_ortho(rows, gen)
    Va, Vb, Vp = random_ortho(cols, gen)
    U, V = ortho_dense(Ua, Ub, Up), ortho_dense(Va, Vb, Vp)
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
    codes = ldlq(Wt, H, maxq)
    return {
        "codes": codes.to(torch.uint8), "scale": float(scale), "rescale": s.float(),
        "U": (Ua.float(), Ub.float(), Up), "V": (Va.float(), Vb.float(), Vp),
    }  # fmt: skip


@register_format
class QuIPLinear(QuantLinear):
    """QuIP storage: packed codes on a uniform [-scale, scale] grid in the rotated basis, plus the
    rescaling vector and the Kronecker factors/permutations of U and V."""

    format = "quip"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 2) -> None:
        super().__init__(in_features, out_features, bias)
        self.bits = bits
        o1, o2 = kron_factors(out_features)
        i1, i2 = kron_factors(in_features)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(1))
        self.register_buffer("rescale", torch.zeros(in_features))
        self.register_buffer("u_a", torch.zeros(o1, o1))
        self.register_buffer("u_b", torch.zeros(o2, o2))
        self.register_buffer("u_perm", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("v_a", torch.zeros(i1, i1))
        self.register_buffer("v_b", torch.zeros(i2, i2))
        self.register_buffer("v_perm", torch.zeros(in_features, dtype=torch.int32))

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @classmethod
    def from_result(cls, r: dict[str, Any], bits: int, bias: torch.Tensor | None) -> QuIPLinear:
        out_f, in_f = r["codes"].shape
        m = cls(in_f, out_f, bias is not None, bits)
        m.qweight = pack(r["codes"], bits)
        m.scale = torch.tensor([r["scale"]])
        m.rescale = r["rescale"]
        m.u_a, m.u_b, m.u_perm = r["U"][0], r["U"][1], r["U"][2].to(torch.int32)
        m.v_a, m.v_b, m.v_perm = r["V"][0], r["V"][1], r["V"][2].to(torch.int32)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def rotated_weight(self) -> torch.Tensor:
        maxq = 2**self.bits - 1
        q = unpack(self.qweight, self.bits, self.in_features).float()
        return ((q / maxq) * 2 - 1) * self.scale.float()

    def dequantize(self) -> torch.Tensor:
        U = ortho_dense(self.u_a.float(), self.u_b.float(), self.u_perm.long())
        V = ortho_dense(self.v_a.float(), self.v_b.float(), self.v_perm.long())
        return (U.T @ self.rotated_weight() @ V) / self.rescale.float()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float() / self.rescale.float()
        h = apply_vt(h, self.v_a.float(), self.v_b.float(), self.v_perm.long())
        h = F.linear(h, self.rotated_weight())
        y = apply_u(h, self.u_a.float(), self.u_b.float(), torch.argsort(self.u_perm.long()))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dt)


@register_method
class QuIP(Method):
    name = "quip"
    kinds = {"hessian"}
    bit_range = (2, 4)
    default_bits = 2
    group_sizes_allowed = False

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"seed": int(options.pop("seed", 0)), "percdamp": float(options.pop("percdamp", 0.01)),
               "true_sequential": bool(options.pop("true_sequential", False))}  # fmt: skip
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats: Stats) -> QuIPLinear:
        seed = self.options["seed"] * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003
        r = quip_quantize(linear.weight, stats.xtx / stats.n, int(self.bits), seed, self.options["percdamp"])
        return QuIPLinear.from_result(r, int(self.bits), linear.bias)
