"""Bit packing for low-bit integer codes: the storage that makes a 4-bit weight take half a byte.

Convention (ours, documented so files written by one version read in the next): codes are packed along the
last dimension as one little-endian bit stream. Code i occupies bits [i*b, (i+1)*b) of the stream and byte j
holds stream bits [8j, 8j+8), least significant first. So for b=4 element 2j is the low nibble of byte j
and element 2j+1 the high nibble; b=2 puts four codes in a byte, first in the lowest bits; b=3 puts eight
codes in three bytes; b=1 is a bitmask, first element in bit 0. A row whose bit count is not a multiple of
8 is zero-padded to a whole byte, so rows stay independent (n codes take ceil(n*b/8) bytes).
"""

from __future__ import annotations

import torch

from llamalab.errors import LlamalabError


def packed_len(n: int, bits: int) -> int:
    """Bytes needed for `n` codes of `bits` bits."""
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dimension into uint8 (..., packed_len(n, bits))."""
    if not 1 <= bits <= 8:
        raise LlamalabError(f"cannot pack {bits}-bit codes; bits must be 1..8")
    n = codes.shape[-1]
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte, shift-and-or (fast path)
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.view(*c.shape[:-1], -1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # 3, 5, 6, 7: go through the bit stream
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=c.device)
    stream = ((c.unsqueeze(-1) >> bit_idx) & 1).flatten(-2)  # (..., n*bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.view(*stream.shape[:-1], -1, 8).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=c.device)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (..., packed_len(n, bits)) to codes uint8 (..., n)."""
    if bits == 8:
        return packed[..., :n]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.flatten(-2)[..., :n].to(torch.uint8)
    bit_idx = torch.arange(8, dtype=torch.int32, device=p.device)
    stream = ((p.unsqueeze(-1) >> bit_idx) & 1).flatten(-2)[..., : n * bits]
    stream = stream.view(*stream.shape[:-1], n, bits)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=p.device)
    return (stream * weights).sum(-1).to(torch.uint8)
