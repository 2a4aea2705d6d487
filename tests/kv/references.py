"""Slow, obviously correct reference caches for the compressed KV methods.

Each keeps every original key (after RoPE, with the cos/sin it was rotated by) and value of every row in
plain Python lists, and on every pass rebuilds from scratch what the method's protocol says attention reads:
which positions are quantized (or merged) after which pass, through the method's own quantize/dequantize
functions (tested apart against their error bounds). They share nothing with the caches under test but those
functions: no packing, no residual windows, no per-row counters, no write-once storage.
"""

from __future__ import annotations

import math

import torch

from llamalab.kv.base import KVCache
from llamalab.kv.kivi import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from llamalab.kv.minicache import slerp
from llamalab.model.rope import apply_rope


class _Rows(KVCache):
    """Per row: keys (H, n, D) after RoPE, keys before RoPE, cos/sin (n, D), values, and the lengths after
    each pass (the protocol's schedule)."""

    def __init__(self, n_layers: int, max_batch: int) -> None:
        self.max_batch, self.max_len = max_batch, 1 << 30
        self.rows = [[None] * n_layers for _ in range(max_batch)]
        self.passes: list[list[int]] = [[] for _ in range(max_batch)]

    def reset(self, rows=None) -> None:
        for r in range(self.max_batch) if rows is None else rows:
            self.rows[r] = [None] * len(self.rows[r])
            self.passes[r] = []

    def nbytes(self) -> int:
        return 0

    def _append(self, layer, b, r, k_pre, k, v, ctx) -> None:
        new = {"k_pre": k_pre[b], "k": k[b], "v": v[b], "cos": ctx.cos[b], "sin": ctx.sin[b]}
        old = self.rows[r][layer]
        self.rows[r][layer] = new if old is None else {n: torch.cat([old[n], new[n]], -2) for n in new}

    def _attend_rows(self, layer, q, k, v, ctx, attention, past_fn):
        q, k_rot = ctx.rotate(q), ctx.rotate(k)
        outs = []
        T = k.shape[2]
        for b, (r, s) in enumerate(zip(ctx.rows, ctx.starts)):
            pk, pv = past_fn(layer, r, s) if s else (k_rot[b, :, :0], v[b, :, :0])
            keys, values = torch.cat([pk.to(k.dtype), k_rot[b]], 1), torch.cat([pv.to(v.dtype), v[b]], 1)
            qp = torch.arange(s, s + T)[:, None]
            mask = torch.arange(s + T)[None, :] <= qp
            outs.append(attention(q[b : b + 1], keys[None], values[None], mask[None, None]))
        for b, r in enumerate(ctx.rows):
            self._append(layer, b, r, k, k_rot, v, ctx)
        if layer == len(self.rows[0]) - 1:
            for r, s in zip(ctx.rows, ctx.starts):
                self.passes[r].append(s + T)
        return torch.cat(outs)


class ReferenceKivi(_Rows):
    """KIVI: after each pass keys quantize the largest multiple of R of their unquantized tail, values all
    but the last R tokens; quantized keys in G-token groups per channel, values per token."""

    def __init__(self, n_layers, max_batch, bits, group, residual) -> None:
        super().__init__(n_layers, max_batch)
        self.bits, self.group, self.residual = bits, group, residual

    def attend(self, layer, q, k, v, ctx, attention):
        return self._attend_rows(layer, q, k, v, ctx, attention, self._past)

    def _past(self, layer, r, s):
        nk = nv = 0
        for end in self.passes[r]:
            nk += (end - nk) // self.residual * self.residual
            nv = max(nv, end - self.residual)
        st = self.rows[r][layer]
        keys, values = st["k"].float().clone(), st["v"].float().clone()
        if nk:
            keys[:, :nk] = dequantize_keys(
                *quantize_keys(keys[:, :nk], self.bits, self.group), self.group, torch.float32
            )
        if nv:
            values[:, :nv] = dequantize_values(
                *quantize_values(values[:, :nv], self.bits, self.group), self.group, torch.float32
            )
        return keys, values


class ReferenceMiniCache(_Rows):
    """MiniCache without quantization, gamma threshold form: pairs (l-1, l) from `start`; every past state of
    a pair's layer is magnitude x SLERP direction, except (token, head) pairs whose distance exceeded the
    threshold of the pass that wrote them (min/max over all tokens up to that pass), which stay original."""

    def __init__(self, n_layers, max_batch, start, t, gamma) -> None:
        super().__init__(n_layers, max_batch)
        self.t, self.gamma = t, gamma
        self.pair_of = {}
        for a in range(start, n_layers - 1, 2):
            self.pair_of[a], self.pair_of[a + 1] = (a, a + 1, 0), (a, a + 1, 1)

    def attend(self, layer, q, k, v, ctx, attention):
        return self._attend_rows(layer, q, k, v, ctx, attention, self._past)

    def _past(self, layer, r, s):
        st = self.rows[r][layer]
        if layer not in self.pair_of:
            return st["k"][:, :s], st["v"][:, :s]
        a, b, which = self.pair_of[layer]
        out = []
        for name in ("k", "v"):
            xa, xb = self.rows[r][a][name][:, :s].float(), self.rows[r][b][name][:, :s].float()
            e, na, nb, d = slerp(xa, xb, self.t)  # (H, s, ...)
            restored = e * (na if which == 0 else nb).half().float()[..., None]
            keep = torch.zeros_like(d, dtype=torch.bool)
            lo, hi, begin = math.inf, -math.inf, 0
            for end in self.passes[r]:  # thresholds as they were when each pass was written
                lo, hi = min(lo, float(d[:, begin:end].min())), max(hi, float(d[:, begin:end].max()))
                keep[:, begin:end] = d[:, begin:end] > lo + self.gamma * (hi - lo)
                begin = end
            original = xa if which == 0 else xb
            out.append(torch.where(keep[..., None], original, restored))
        return out[0], out[1]


class ReferenceAqua(_Rows):
    """AQUA-KV: the first `sinks` positions and the unflushed tail exact; positions flushed so far (a pass
    that brings `buffer` or more tokens past the last flush flushes everything up to its end) rebuilt from
    the originals by the predictor chain over layers, each layer's residual quantized, then rotated with
    the cos/sin the position had."""

    def __init__(self, n_layers, max_batch, predictors, quantizer, first, sinks, buffer) -> None:
        super().__init__(n_layers, max_batch)
        self.predictors, self.quantizer, self.first = predictors, quantizer, first
        self.sinks, self.buffer = sinks, buffer

    def attend(self, layer, q, k, v, ctx, attention):
        return self._attend_rows(layer, q, k, v, ctx, attention, self._past)

    def _past(self, layer, r, s):
        chunks, q_end = [], self.sinks  # the write-once chunks flushed so far
        for end in self.passes[r]:
            if end - q_end >= self.buffer:
                chunks.append((q_end, end))
                q_end = end
        st = self.rows[r][layer]
        keys, values = st["k"][:, :s].float().clone(), st["v"][:, :s].float().clone()
        H = keys.shape[0]
        for c0, c1 in chunks:  # each chunk quantized on its own, as it was written
            rk, rv = self._chain(r, layer, slice(c0, c1))
            k_pre = rk.reshape(c1 - c0, H, -1).transpose(0, 1)  # (H, n, D)
            keys[:, c0:c1] = apply_rope(k_pre[None], st["cos"][None, c0:c1], st["sin"][None, c0:c1])[
                0
            ].float()
            values[:, c0:c1] = rv.reshape(c1 - c0, H, -1).transpose(0, 1)
        return keys, values

    def _chain(self, r, layer, span):
        """Reconstruction (n, C) of keys and values at `layer` of positions `span`, from layer 0 up."""
        rk = rv = None
        for ell in range(layer + 1):
            x = self.rows[r][ell]
            tk, tv = _flat(x["k_pre"][:, span]), _flat(x["v"][:, span])
            if ell == 0:
                rk, rv = self.first.quantize_dequantize(tk), self.first.quantize_dequantize(tv)
                continue
            if self.predictors is None:  # plain HIGGS
                rk, rv = self.quantizer.quantize_dequantize(tk), self.quantizer.quantize_dequantize(tv)
                continue
            pk = self.predictors.predict_keys(ell, rk)
            rk = pk + self.quantizer.quantize_dequantize(tk - pk)
            pv = self.predictors.predict_values(ell, rk, rv)
            rv = pv + self.quantizer.quantize_dequantize(tv - pv)
        return rk, rv


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(H, n, D) -> (n, H*D)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).float()
