"""Storage for the binarization family (PB-LLM, BiLLM): sign bits, bitmasks and per-row parameters.

Everything the dequantized weight depends on is stored and counted, so `bits_per_weight` is the real cost
(masks included), not the papers' nominal figure (research note §2.6-2.7: "1.7 bits" for PB-LLM counts
neither the salience mask nor the scales). A binarized weight is sign(w - mu) * alpha + mu with mu and alpha
per (row, group); sign(0) is stored as +1 (one bit cannot hold torch.sign's 0; the quantizers use the same
convention, so what is stored is what was error-compensated).
"""

from __future__ import annotations

from typing import Any

import torch

from llamalab.quant.base import QuantLinear, register_format
from llamalab.quant.pack import pack, packed_len, unpack


def signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


@register_format
class PBLinear(QuantLinear):
    """PB-LLM: a bitmask of binarized positions; their sign bits (row-major, packed); the salient weights
    as `high_bits` per-channel asymmetric codes (row-major); mu/alpha per (row, group) in fp16."""

    format = "pbllm"
    fp16_buffers = ("mu", "alpha", "high_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        high_bits: int = 8,
        n_low: int = 0,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size, self.high_bits, self.n_low = group_size, high_bits, n_low
        n = in_features * out_features
        ng = -(-in_features // group_size)
        self.register_buffer("mask", torch.zeros(packed_len(n, 1), dtype=torch.uint8))
        self.register_buffer("sign_bits", torch.zeros(packed_len(n_low, 1), dtype=torch.uint8))
        self.register_buffer("high_codes", torch.zeros(packed_len(n - n_low, high_bits), dtype=torch.uint8))
        self.register_buffer("high_scale", torch.zeros(out_features))
        self.register_buffer("high_zero", torch.zeros(out_features, dtype=torch.uint8))
        self.register_buffer("mu", torch.zeros(out_features, ng))
        self.register_buffer("alpha", torch.zeros(out_features, ng))

    def spec(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "high_bits": self.high_bits, "n_low": self.n_low}

    @classmethod
    def from_parts(
        cls, low_mask, sign_pos, high_q, high_scale, high_zero, mu, alpha, group_size, high_bits, bias
    ) -> PBLinear:
        out_f, in_f = low_mask.shape
        n_low = int(low_mask.sum())
        m = cls(in_f, out_f, bias is not None, group_size, high_bits, n_low)
        flat = low_mask.flatten()
        m.mask = pack(flat.to(torch.uint8), 1)
        m.sign_bits = pack(sign_pos.flatten()[flat].to(torch.uint8), 1)
        m.high_codes = pack(high_q.flatten()[~flat].to(torch.uint8), high_bits)
        m.high_scale, m.high_zero = high_scale.float(), high_zero.to(torch.uint8)
        m.mu, m.alpha = mu.float(), alpha.float()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        low = unpack(self.mask, 1, N * K).bool().view(N, K)
        gi = torch.arange(K) // G
        mu, alpha = self.mu.float()[:, gi], self.alpha.float()[:, gi]
        w = torch.empty(N, K)
        sgn = unpack(self.sign_bits, 1, self.n_low).float() * 2 - 1
        w[low] = sgn * alpha[low] + mu[low]
        q = unpack(self.high_codes, self.high_bits, N * K - self.n_low).float()
        s = self.high_scale.float()[:, None].expand(N, K)[~low]
        z = self.high_zero.float()[:, None].expand(N, K)[~low]
        w[~low] = s * (q - z)
        return w


@register_format
class BiLLMLinear(QuantLinear):
    """BiLLM: salient columns (a column bitmask) binarized to second order (two sign planes), the rest
    split by a per-weight bitmask into two first-order binarized groups; 8 fp16 parameters per (row, block):
    mu/alpha of group 1, group 2, salient order 1, salient order 2."""

    format = "billm"
    fp16_buffers = ("params",)

    def __init__(
        self, in_features: int, out_features: int, bias: bool, blocksize: int = 128, n_salient: int = 0
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.blocksize, self.n_salient = blocksize, n_salient
        N, K = out_features, in_features
        nb = -(-K // blocksize)
        self.register_buffer("col_mask", torch.zeros(packed_len(K, 1), dtype=torch.uint8))
        self.register_buffer("split", torch.zeros(N, packed_len(K - n_salient, 1), dtype=torch.uint8))
        self.register_buffer("sign1", torch.zeros(N, packed_len(K, 1), dtype=torch.uint8))
        self.register_buffer("sign2", torch.zeros(N, packed_len(n_salient, 1), dtype=torch.uint8))
        self.register_buffer("params", torch.zeros(N, nb, 8))

    def spec(self) -> dict[str, Any]:
        return {"blocksize": self.blocksize, "n_salient": self.n_salient}

    @classmethod
    def from_parts(cls, salient_cols, split, sign1, sign2, params, blocksize, bias) -> BiLLMLinear:
        """salient_cols (K,) bool; split (N, K) bool (group 2); sign1 (N, K) bool; sign2 (N, K) bool (used
        on salient columns); params (N, n_blocks, 8)."""
        N, K = sign1.shape
        ns = int(salient_cols.sum())
        m = cls(K, N, bias is not None, blocksize, ns)
        m.col_mask = pack(salient_cols.to(torch.uint8)[None], 1)[0]
        m.split = pack(split[:, ~salient_cols].to(torch.uint8), 1)
        m.sign1 = pack(sign1.to(torch.uint8), 1)
        m.sign2 = pack(sign2[:, salient_cols].to(torch.uint8), 1)
        m.params = params.float()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        sal = unpack(self.col_mask[None], 1, K)[0].bool()
        bi = torch.arange(K) // self.blocksize
        p = self.params.float()[:, bi]  # (N, K, 8)
        s1 = unpack(self.sign1, 1, K).float() * 2 - 1
        split = torch.zeros(N, K, dtype=torch.bool)
        split[:, ~sal] = unpack(self.split, 1, K - self.n_salient).bool()
        mu = torch.where(split, p[..., 2], p[..., 0])
        alpha = torch.where(split, p[..., 3], p[..., 1])
        w = s1 * alpha + mu
        if self.n_salient:
            s2 = unpack(self.sign2, 1, self.n_salient).float() * 2 - 1
            ps = p[:, sal]
            w[:, sal] = (s1[:, sal] * ps[..., 5] + ps[..., 4]) + (s2 * ps[..., 7] + ps[..., 6])
        return w
