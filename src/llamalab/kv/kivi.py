"""KIVI: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (Liu, Yuan et al., ICML 2024,
arXiv 2402.02750); reference code jy-yuan/KIVI (`models/llama_kivi.py`, `quant/new_pack.py`).

What is reproduced:
- keys (after RoPE, as the reference caches them) quantized *per channel*: asymmetric min/max codes over
  groups of `group_size` consecutive tokens, one scale and zero point per channel and group;
- values quantized *per token*: groups of `group_size` channels of one token;
- 2 or 4 bits (the paper's KIVI-2 / KIVI-4), scales and zero points in fp16 as the reference keeps them;
- the full-precision residual of recent tokens (`residual`, R): new keys stay in full precision until R
  of them have gathered, then the R (after a prefill: the largest multiple of R) are quantized at once;
  values keep the last R tokens in full precision and quantize each token that falls out of that window;
- a pass attends over the quantized past, the residual, and its own tokens in full precision; what it
  wrote is compressed afterwards (the reference's prefill/decode order).
- defaults: group size 32 and residual 128 (the paper's LongBench setting, docs/long_bench.md).

Chunked prefill generalises the reference's two cases with one rule: after a pass, keys quantize the
largest multiple of R of their full-precision tokens, values all but the last R.

Storage is really packed (`llamalab.quant.pack`: 4 codes a byte at 2 bits, 2 at 4 bits), allocated once
for `max_len` positions per row, so `nbytes()` is the memory held. Decode reads the packed form directly:
the native decode step (kernels/kivi_layout.cpp) dequantizes keys and values 16 at a time in registers
inside attention, as the reference's CUDA kernels multiply against the packed codes, and quantizes what
leaves the residual windows, with this file's rounding. Prefill, and decode where the kernels are not
available, dequantize one layer's past at a time into a transient tensor (`KiviStore.read`).
Not reproduced: the CUDA/Triton kernels, separate key and value bit widths (`--kv-bits` sets both).
"""

from __future__ import annotations

import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.kv.base import KVCache, NativeKV
from llamalab.kv.parts.attend import attend_over
from llamalab.kv.registry import CacheSpec, register_kv_cache
from llamalab.quant.pack import pack, packed_len, unpack

BITS = (2, 4)
GROUP_SIZE = 32
RESIDUAL = 128


def _minmax_codes(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric min/max quantization of x (fp32) over `dim`: codes uint8, fp16 scale and minimum. The codes
    are computed with the fp16 scale and minimum that are stored, so dequantization is consistent."""
    top = 2**bits - 1
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    mn16, scale16 = mn.half(), ((mx - mn) / top).half()
    scale = scale16.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code is 0
    codes = ((x - mn16.float()) / safe).round_().clamp_(0, top).to(torch.uint8)
    return codes, scale16, mn16


def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """Per-channel quantization of keys (..., T, D), T a multiple of `group`: codes (..., T, D) and fp16
    scale / minimum (..., T/group, D)."""
    *lead, T, D = k.shape
    x = k.float().reshape(*lead, T // group, group, D)
    codes, scale, mn = _minmax_codes(x, -2, bits)
    return codes.reshape(*lead, T, D), scale.squeeze(-2), mn.squeeze(-2)


def dequantize_keys(codes, scale, mn, group: int, dtype) -> torch.Tensor:
    *lead, T, D = codes.shape
    x = codes.reshape(*lead, T // group, group, D).to(dtype)
    return (x * scale.unsqueeze(-2).to(dtype) + mn.unsqueeze(-2).to(dtype)).reshape(*lead, T, D)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """Per-token quantization of values (..., T, D), D a multiple of `group`: codes (..., T, D) and fp16
    scale / minimum (..., T, D/group)."""
    *lead, T, D = v.shape
    x = v.float().reshape(*lead, T, D // group, group)
    codes, scale, mn = _minmax_codes(x, -1, bits)
    return codes.reshape(*lead, T, D), scale.squeeze(-1), mn.squeeze(-1)


def dequantize_values(codes, scale, mn, group: int, dtype) -> torch.Tensor:
    *lead, T, D = codes.shape
    x = codes.reshape(*lead, T, D // group, group).to(dtype)
    return (x * scale.unsqueeze(-1).to(dtype) + mn.unsqueeze(-1).to(dtype)).reshape(*lead, T, D)


class KiviStore:
    """One layer's keys and values for `max_batch` rows in KIVI's format: packed codes and fp16 scales for
    quantized positions, full-precision residual windows for the recent ones. Positions of a row are
    appended in order; `read` gives the whole past of some rows as a transient dense tensor."""

    def __init__(self, n_heads, head_dim, max_len, max_batch, bits, group, residual, dtype, device) -> None:
        if head_dim % group:
            raise LlamalabError(f"--kv-group-size {group} must divide the head dimension {head_dim}")
        if residual % group:
            raise LlamalabError(f"--kv-arg residual={residual} must be a multiple of --kv-group-size {group}")
        self.bits, self.group, self.residual, self.dtype, self.D = bits, group, residual, dtype, head_dim
        cap = -(-max_len // group) * group  # quantized keys come in whole groups
        B, H, D, pb = max_batch, n_heads, head_dim, packed_len(head_dim, bits)
        u8, f16 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float16, device=device)
        self.k_codes = torch.zeros(B, H, cap, pb, **u8)
        self.k_scale = torch.zeros(B, H, cap // group, D, **f16)
        self.k_min = torch.zeros(B, H, cap // group, D, **f16)
        self.v_codes = torch.zeros(B, H, cap, pb, **u8)
        self.v_scale = torch.zeros(B, H, cap, D // group, **f16)
        self.v_min = torch.zeros(B, H, cap, D // group, **f16)
        # full precision: keys wait here until `residual` of them gather (so at most residual - 1 between
        # passes); values keep the last `residual` tokens
        self.k_res = torch.zeros(B, H, residual, D, dtype=dtype, device=device)
        self.v_res = torch.zeros(B, H, residual, D, dtype=dtype, device=device)
        self.nk = [0] * B  # quantized key positions of each row (a multiple of `residual`)
        self.nv = [0] * B  # quantized value positions
        self.length = [0] * B  # positions held

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.tensors(), self.k_res, self.v_res])

    def reset(self, rows: list[int]) -> None:
        for r in rows:
            self.nk[r] = self.nv[r] = self.length[r] = 0

    def read(self, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values at positions 0..max length - 1 of `rows` (B, H, P, D), None when all are empty;
        slots past a row's own length are zero."""
        P = max(self.length[r] for r in rows)
        if P == 0:
            return None, None
        B, H, D = len(rows), self.k_res.shape[1], self.D
        keys = self.k_res.new_empty(B, H, P, D)
        values = self.v_res.new_empty(B, H, P, D)
        nk, nv = max(self.nk[r] for r in rows), max(self.nv[r] for r in rows)
        if nk:
            codes = unpack(self.k_codes[rows, :, :nk], self.bits, D)
            g = nk // self.group
            keys[:, :, :nk] = dequantize_keys(
                codes, self.k_scale[rows, :, :g], self.k_min[rows, :, :g], self.group, self.dtype
            )
        if nv:
            codes = unpack(self.v_codes[rows, :, :nv], self.bits, D)
            values[:, :, :nv] = dequantize_values(
                codes, self.v_scale[rows, :, :nv], self.v_min[rows, :, :nv], self.group, self.dtype
            )
        for b, r in enumerate(rows):  # each row's full-precision tail after its own quantized part
            n = self.length[r]
            keys[b, :, self.nk[r] : n] = self.k_res[r, :, : n - self.nk[r]]
            values[b, :, self.nv[r] : n] = self.v_res[r, :, self.residual - (n - self.nv[r]) :]
            # A row shorter than P is padded. The mask hides the padding, but attention still multiplies
            # its zero weights by these slots, and 0 * NaN = NaN: uninitialised memory there turned a short
            # row's output into NaN (token 0 forever), so the padding must hold finite values.
            keys[b, :, n:] = 0
            values[b, :, n:] = 0
        return keys, values

    def write(self, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v (B, H, T, D) to each row, then quantize what falls out of the residual windows."""
        for b, r in enumerate(rows):
            self._write_keys(r, k[b])
            self._write_values(r, v[b])
            self.length[r] += k.shape[2]

    def _write_keys(self, r: int, k: torch.Tensor) -> None:
        n_res = self.length[r] - self.nk[r]
        full = torch.cat([self.k_res[r, :, :n_res], k], 1)  # (H, n_res + T, D)
        n_q = full.shape[1] // self.residual * self.residual
        if n_q:
            s = self.nk[r]
            if s + n_q > self.k_codes.shape[2]:
                raise ContextLengthError(f"KIVI cache row {r} is full ({self.k_codes.shape[2]} positions)")
            codes, scale, mn = quantize_keys(full[:, :n_q], self.bits, self.group)
            self.k_codes[r, :, s : s + n_q] = pack(codes, self.bits)
            g0, g1 = s // self.group, (s + n_q) // self.group
            self.k_scale[r, :, g0:g1], self.k_min[r, :, g0:g1] = scale, mn
            self.nk[r] = s + n_q
        rest = full.shape[1] - n_q
        self.k_res[r, :, :rest] = full[:, n_q:]

    def _write_values(self, r: int, v: torch.Tensor) -> None:
        n_res = self.length[r] - self.nv[r]
        full = torch.cat([self.v_res[r, :, self.residual - n_res :], v], 1)  # (H, n_res + T, D)
        n_q = max(0, full.shape[1] - self.residual)
        if n_q:
            s = self.nv[r]
            if s + n_q > self.v_codes.shape[2]:
                raise ContextLengthError(f"KIVI cache row {r} is full ({self.v_codes.shape[2]} positions)")
            codes, scale, mn = quantize_values(full[:, :n_q], self.bits, self.group)
            self.v_codes[r, :, s : s + n_q] = pack(codes, self.bits)
            self.v_scale[r, :, s : s + n_q], self.v_min[r, :, s : s + n_q] = scale, mn
            self.nv[r] = s + n_q
        kept = full[:, n_q:]  # the window is right-aligned: its last slot is the newest token
        self.v_res[r, :, self.residual - kept.shape[1] :] = kept


class KiviCache(KVCache):
    """KIVI for every attention layer (see the module docstring)."""

    def __init__(self, config, max_len, max_batch, bits, group, residual, dtype, device) -> None:
        self.max_batch, self.max_len = max_batch, max_len
        self.bits, self.group, self.residual = bits, group, residual
        self.layers = [
            KiviStore(
                config.num_key_value_heads,
                config.head_dim,
                max_len,
                max_batch,
                bits,
                group,
                residual,
                dtype,
                device,
            )  # fmt: skip
            for _ in range(config.num_hidden_layers)
        ]

    def attend(self, layer, q, k, v, ctx, attention):
        store = self.layers[layer]
        for r, s in zip(ctx.rows, ctx.starts):
            if store.length[r] != s:
                raise LlamalabError(
                    f"KIVI appends in order: row {r} holds {store.length[r]}, pass starts at {s}"
                )
        if max(ctx.starts) + k.shape[2] > self.max_len:
            raise ContextLengthError(f"sequence reaches beyond the cache's {self.max_len} positions")
        k = ctx.rotate(k)
        past_k, past_v = store.read(ctx.rows)
        out = attend_over(ctx.rotate(q), k, v, past_k, past_v, ctx.starts, attention)
        store.write(ctx.rows, k, v)
        return out

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def reset(self, rows=None) -> None:
        for s in self.layers:
            s.reset(list(range(self.max_batch)) if rows is None else rows)

    def native_kv(self) -> NativeKV | None:
        """The packed stores as the native decode step reads them (kernels/kivi_layout.cpp), which
        dequantizes them inside attention; None where its value groups do not fit one 16-lane vector."""
        D = self.layers[0].D
        if D // self.group > 16 or type(self).attend is not KiviCache.attend:
            return None
        tensors = [t for s in self.layers for t in (*s.tensors(), s.k_res, s.v_res)]
        settings = [self.bits, self.group, self.residual, self.max_len]
        return NativeKV("kivi", tensors, self.layers[0].dtype, settings, self._in_order, self._advance)

    def _in_order(self, rows: list[int], starts: list[int]) -> bool:
        return all(self.layers[0].length[r] == s for r, s in zip(rows, starts))

    def _advance(self, rows: list[int], starts: list[int]) -> None:
        # The step appended one token to each row of every layer, quantizing as `KiviStore.write` does; the
        # counts follow from the length (see kernels/kivi_layout.cpp).
        for store in self.layers:
            for r, s in zip(rows, starts):
                n = s + 1
                store.length[r] = n
                store.nk[r] = n // self.residual * self.residual
                store.nv[r] = max(0, n - self.residual)


def kivi_settings(spec: CacheSpec, default_bits: int = 2) -> tuple[int, int, int]:
    """(bits, group size, residual) from `--kv-bits`, `--kv-group-size`, `--kv-arg residual=R`."""
    bits = default_bits if spec.bits is None else spec.bits
    if bits not in BITS:
        raise LlamalabError(f"--kv-bits {spec.bits:g} is not supported by --kv {spec.method}; use 2 or 4")
    group = GROUP_SIZE if spec.group_size is None else spec.group_size
    try:
        residual = int(spec.args.get("residual", RESIDUAL))
    except ValueError:
        raise LlamalabError(f"--kv-arg residual={spec.args['residual']!r} is not an integer") from None
    if group < 1 or residual < 1:
        raise LlamalabError("--kv-group-size and --kv-arg residual must be positive")
    return int(bits), group, residual


@register_kv_cache("kivi")
def kivi_cache(spec: CacheSpec, config, max_len: int, max_batch: int, dtype, device) -> KiviCache:
    """KIVI: 2/4-bit keys per channel and values per token, with a full-precision residual window."""
    spec.refuse_settings(accepted=("bits", "group_size", "residual"))
    bits, group, residual = kivi_settings(spec)
    return KiviCache(config, max_len, max_batch, bits, group, residual, dtype, device)
