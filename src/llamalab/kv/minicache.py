"""MiniCache: "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models" (Liu et al.,
NeurIPS 2024, arXiv 2405.14366). There is no official code (AkideLiu/MiniCache is a project page), so this
follows the paper's description (see ../shared/research/kvcache.md, section 1.2, for what could and could
not be checked against its text).

What is reproduced:
- from layer `start` (default L/2, "merging from the middle layer") adjacent pairs (l-1, l) share one state
  per token and KV head, for keys and values separately; an odd layer left at the end is not merged;
- reparameterisation: each state is its magnitude ||x|| (kept for both layers) times a unit direction; the
  two directions are merged by SLERP with interpolation `t` (default 0.6), falling back to a normalised
  linear blend where the angle is too small for sin(angle) to be divided by;
- restore: x^l = ||x^l|| e and x^(l-1) = ||x^(l-1)|| e;
- token retention: the angular distance d = angle / pi of each (token, head) pair; pairs that are too
  dissimilar keep both layers' *original* states (with their index) and are scattered back over the
  restored ones exactly. The paper's threshold form is `gamma` (default 0.05): retain d > d_min +
  gamma (d_max - d_min), with d_min / d_max running over the tokens merged so far in that row (prefill and
  decode alike); the alternative `retention=f` keeps the fraction f of pairs with the largest d (the
  paper's ablation ratios 0..1%), against a running histogram of d;
- composition with quantization (`--kv-bits 2|4`): the unmerged layers and the merged directions are kept
  in KIVI's format (keys per channel, values per token, full-precision residual); magnitudes are fp16,
  retained originals full precision.

Order within a pass: layer l-1 attends over its restored past plus its own new tokens exactly, and its
new states wait (pending) until layer l has produced its own; then the pair is merged and stored.
Keys are merged after RoPE: both layers' keys at one position are rotated by the same orthogonal matrix, so
angles, norms and SLERP do not change.
Not reproduced: merging more than two layers, the paper's CUDA kernels and batch-serving system.
"""

from __future__ import annotations

import math

import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.kv.base import KVCache
from llamalab.kv.kivi import KiviStore, kivi_settings
from llamalab.kv.parts.attend import attend_over
from llamalab.kv.parts.store import DenseStore
from llamalab.kv.registry import CacheSpec, register_kv_cache

T_DEFAULT = 0.6
GAMMA_DEFAULT = 0.05
_HIST_BINS = 1000


def slerp(xa: torch.Tensor, xb: torch.Tensor, t: float):
    """Merge states xa (layer l-1) and xb (layer l), (..., D): the unit direction e (..., D), both
    magnitudes (...,) and the angular distance d = angle / pi in [0, 1] (...,)."""
    na, nb = xa.norm(dim=-1), xb.norm(dim=-1)
    ua = xa / na.clamp(min=1e-12)[..., None]
    ub = xb / nb.clamp(min=1e-12)[..., None]
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin < 1e-6  # (nearly) parallel or opposite: SLERP's weights are 0/0
    safe = torch.where(small, torch.ones_like(sin), sin)
    wa = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    e = wa[..., None] * ua + wb[..., None] * ub
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return e, na, nb, omega / math.pi


class Retention:
    """Which merged (token, head) pairs keep their originals, decided as they are written, per row."""

    def __init__(self, max_batch: int, gamma: float | None, fraction: float | None) -> None:
        self.gamma, self.fraction = gamma, fraction
        self.lo = [math.inf] * max_batch
        self.hi = [-math.inf] * max_batch
        self.hist = torch.zeros(max_batch, _HIST_BINS, dtype=torch.long)

    def reset(self, row: int) -> None:
        self.lo[row], self.hi[row] = math.inf, -math.inf
        self.hist[row] = 0

    def select(self, row: int, d: torch.Tensor) -> torch.Tensor:
        """Boolean mask over `d` (any shape) of the pairs to retain, updating the row's running statistics."""
        if self.fraction is not None:
            bins = (d.flatten().float() * _HIST_BINS).long().clamp(0, _HIST_BINS - 1)
            self.hist[row] += torch.bincount(
                bins, minlength=_HIST_BINS
            ).cpu()  # the histogram lives on the CPU
            if self.fraction <= 0:
                return torch.zeros_like(d, dtype=torch.bool)
            # the smallest bin edge above which at most `fraction` of all pairs seen so far lie
            above = self.hist[row].flip(0).cumsum(0).flip(0)  # pairs in this bin or higher
            allowed = self.fraction * float(self.hist[row].sum())
            edge = int((above > allowed).nonzero().max()) + 1 if bool((above > allowed).any()) else 0
            return d >= edge / _HIST_BINS
        self.lo[row] = min(self.lo[row], float(d.min()))
        self.hi[row] = max(self.hi[row], float(d.max()))
        return d > self.lo[row] + self.gamma * (self.hi[row] - self.lo[row])


class Kept:
    """Retained originals of one merged pair for one of K/V: per row, flat (position * heads + head)
    indices and both layers' original states."""

    def __init__(self, max_batch: int) -> None:
        self.index: list[list[torch.Tensor]] = [[] for _ in range(max_batch)]
        self.states: list[list[torch.Tensor]] = [[] for _ in range(max_batch)]

    def reset(self, row: int) -> None:
        self.index[row], self.states[row] = [], []

    def add(self, row: int, index: torch.Tensor, states: torch.Tensor) -> None:
        if len(index):
            self.index[row].append(index.to(torch.int32))
            self.states[row].append(states.clone())

    def count(self, row: int) -> int:
        return sum(len(i) for i in self.index[row])

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for lists in (self.index, self.states) for ts in lists for t in ts
        )

    def scatter(self, out: torch.Tensor, b: int, row: int, which: int) -> None:
        """Write the retained originals of layer `which` (0: l-1, 1: l) of `row` into out[b] (H, P, D)."""
        if not self.index[row]:
            return
        index = torch.cat(self.index[row]).long()
        states = torch.cat(self.states[row])[:, which]
        H, P, D = out.shape[1:]
        pos, head = index // H, index % H
        keep = pos < P
        out[b, head[keep], pos[keep]] = states[keep].to(out.dtype)


class MiniCache(KVCache):
    """Cross-layer merged KV cache (see the module docstring)."""

    def __init__(self, config, max_len, max_batch, start, t, gamma, fraction, make_store, device) -> None:
        self.max_batch, self.max_len, self.t = max_batch, max_len, t
        n = config.num_hidden_layers
        if not 0 <= start < n - 1:
            raise LlamalabError(f"--kv-arg start={start} must be 0..{n - 2} (the model has {n} layers)")
        self.start = start
        self.pairs = [(a, a + 1) for a in range(start, n - 1, 2)]
        self.pair_of = {layer: (p, i) for p, pair in enumerate(self.pairs) for i, layer in enumerate(pair)}
        self.stores = {layer: make_store() for layer in range(n) if layer not in self.pair_of}
        self.merged = [make_store() for _ in self.pairs]  # the shared unit directions of each pair
        H = config.num_key_value_heads
        # ||x|| of (layer l-1, layer l) x (keys, values) per position and head
        self.magnitudes = [
            torch.zeros(max_batch, H, max_len, 2, 2, dtype=torch.float16, device=device) for _ in self.pairs
        ]
        self.kept = [(Kept(max_batch), Kept(max_batch)) for _ in self.pairs]
        self.retention = [(Retention(max_batch, gamma, fraction), Retention(max_batch, gamma, fraction))
                          for _ in self.pairs]  # fmt: skip
        self.merged_pairs = [0] * len(self.pairs)  # (token, head) pairs merged so far, for reports
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._directions: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    # --- the seam -----------------------------------------------------------------------------------

    def attend(self, layer, q, k, v, ctx, attention):
        if max(ctx.starts) + k.shape[2] > self.max_len:
            raise ContextLengthError(f"sequence reaches beyond the cache's {self.max_len} positions")
        q, k = ctx.rotate(q), ctx.rotate(k)
        if layer not in self.pair_of:
            store = self.stores[layer]
            self._check_order(store, ctx)
            past_k, past_v = store.read(ctx.rows)
            out = attend_over(q, k, v, past_k, past_v, ctx.starts, attention)
            store.write(ctx.rows, k, v)
            return out
        p, which = self.pair_of[layer]
        if which == 0:  # layer l-1 reads the pair's directions once for both layers of this pass
            self._check_order(self.merged[p], ctx)
            self._directions[p] = self.merged[p].read(ctx.rows)
        past_k, past_v = self.restore(p, which, ctx.rows)
        out = attend_over(q, k, v, past_k, past_v, ctx.starts, attention)
        if which == 0:
            self._pending[p] = (k, v)
        else:
            ka, va = self._pending.pop(p)
            self._directions.pop(p, None)
            self.merge(p, ctx.rows, ctx.starts, (ka, k), (va, v))
        return out

    def _check_order(self, store, ctx) -> None:
        for r, s in zip(ctx.rows, ctx.starts):
            if store.length[r] != s:
                raise LlamalabError(f"MiniCache appends in order: row {r} holds {store.length[r]}, not {s}")

    # --- merge and restore ----------------------------------------------------------------------------

    def merge(self, p: int, rows, starts, keys: tuple, values: tuple) -> None:
        """Merge the new states of pair p (each (B, H, T, D) for layers l-1 and l) and store them."""
        T = keys[0].shape[2]
        dirs, mags = [], []
        for kind, (xa, xb) in enumerate((keys, values)):
            e, na, nb, d = slerp(xa.float(), xb.float(), self.t)
            dirs.append(e.to(xa.dtype))
            mags.append(torch.stack([na, nb], -1))  # (B, H, T, 2)
            H = xa.shape[1]
            for b, (r, s) in enumerate(zip(rows, starts)):
                keep = self.retention[p][kind].select(r, d[b])  # (H, T)
                head, pos = keep.nonzero(as_tuple=True)
                originals = torch.stack([xa[b, head, pos], xb[b, head, pos]], 1)  # (n, 2, D)
                self.kept[p][kind].add(r, (pos + s) * H + head, originals)
            self.merged_pairs[p] += d.numel()
        mag = torch.stack(mags, -1).half()  # (B, H, T, 2 layers, 2 kinds)
        for b, (r, s) in enumerate(zip(rows, starts)):
            self.magnitudes[p][r, :, s : s + T] = mag[b]
        self.merged[p].write(rows, dirs[0], dirs[1])

    def restore(self, p: int, which: int, rows) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Past keys and values of layer `which` (0: l-1, 1: l) of pair p for `rows`: magnitude times the
        shared direction, with retained originals put back."""
        ek, ev = self._directions[p]
        if ek is None:
            return None, None
        P = ek.shape[2]
        mag = self.magnitudes[p][rows, :, :P, which].to(ek.dtype)  # (B, H, P, 2 kinds)
        keys, values = ek * mag[..., 0, None], ev * mag[..., 1, None]
        for b, r in enumerate(rows):
            self.kept[p][0].scatter(keys, b, r, which)
            self.kept[p][1].scatter(values, b, r, which)
        return keys, values

    def past(self, layer: int, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The past keys (after RoPE) and values attention reads at `layer` for `rows` (B, H, P, D)."""
        if layer not in self.pair_of:
            return self.stores[layer].read(rows)
        p, which = self.pair_of[layer]
        self._directions[p] = self.merged[p].read(rows)
        try:
            return self.restore(p, which, rows)
        finally:
            self._directions.pop(p)

    # --- bookkeeping ----------------------------------------------------------------------------------

    def retained_fraction(self) -> float:
        """Share of merged (token, head) pairs, over both K and V and all pairs, that kept their originals."""
        kept = sum(k.count(r) for pair in self.kept for k in pair for r in range(self.max_batch))
        merged = sum(self.merged_pairs)  # counted once for K and once for V
        return kept / merged if merged else 0.0

    def nbytes(self) -> int:
        total = sum(s.nbytes() for s in self.stores.values()) + sum(s.nbytes() for s in self.merged)
        total += sum(m.numel() * m.element_size() for m in self.magnitudes)
        return total + sum(k.nbytes() for pair in self.kept for k in pair)

    def reset(self, rows=None) -> None:
        rows = list(range(self.max_batch)) if rows is None else rows
        for s in [*self.stores.values(), *self.merged]:
            s.reset(rows)
        for r in rows:
            for pair in self.kept:
                for k in pair:
                    k.reset(r)
            for pair in self.retention:
                for ret in pair:
                    ret.reset(r)


def _float_arg(spec: CacheSpec, key: str, default: float | None) -> float | None:
    if key not in spec.args:
        return default
    try:
        return float(spec.args[key])
    except ValueError:
        raise LlamalabError(f"--kv-arg {key}={spec.args[key]!r} is not a number") from None


@register_kv_cache("minicache")
def minicache_cache(spec: CacheSpec, config, max_len: int, max_batch: int, dtype, device) -> MiniCache:
    """MiniCache: adjacent layers from the middle on share SLERP-merged directions; optionally KIVI-quantized."""
    spec.refuse_settings(accepted=("bits", "group_size", "residual", "start", "t", "gamma", "retention"))
    if spec.bits is None and (spec.group_size is not None or "residual" in spec.args):
        raise LlamalabError("--kv-group-size and --kv-arg residual need --kv-bits 2|4 with --kv minicache")
    t = _float_arg(spec, "t", T_DEFAULT)
    if not 0.0 <= t <= 1.0:
        raise LlamalabError(f"--kv-arg t={t:g} must be in [0, 1]")
    if "gamma" in spec.args and "retention" in spec.args:
        raise LlamalabError("give one of --kv-arg gamma=... (threshold) or --kv-arg retention=... (fraction)")
    fraction = _float_arg(spec, "retention", None)
    gamma = None if fraction is not None else _float_arg(spec, "gamma", GAMMA_DEFAULT)
    if (fraction is not None and not 0 <= fraction <= 1) or (gamma is not None and not 0 <= gamma <= 1):
        raise LlamalabError("--kv-arg gamma / retention must be in [0, 1]")
    start = int(_float_arg(spec, "start", config.num_hidden_layers // 2))
    H, D = config.num_key_value_heads, config.head_dim
    if spec.bits is None:

        def make_store():
            return DenseStore(H, D, max_len, max_batch, dtype, device)
    else:
        bits, group, residual = kivi_settings(spec)

        def make_store():
            return KiviStore(H, D, max_len, max_batch, bits, group, residual, dtype, device)

    return MiniCache(config, max_len, max_batch, start, t, gamma, fraction, make_store, device)
