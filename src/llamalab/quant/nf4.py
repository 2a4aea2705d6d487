"""NF4 with double quantization: the 4-bit NormalFloat storage of QLoRA (no fine-tuning here).

Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv 2305.14314. Reference code: bitsandbytes `functional.py` (`create_normal_map`, `quantize_4bit`,
`create_dynamic_map`, `quantize_blockwise`). The study's "NormalFloat (no FT)" row is this storage; the LoRA
fine-tuning (QLoRA / IR-QLoRA) belongs to the training work and is not done here.

Reproduced: the exact 16-value NF4 table; the weight flattened row-major in blocks of 64 with an fp32 absmax
per block; each value mapped to the nearest table entry of w / absmax; two codes per byte with the *first
element in the high nibble* (bitsandbytes' order). Double quantization: offset = mean(absmax), the centred
absmaxes quantized blockwise (256 per block) to 8 bits with bitsandbytes' signed dynamic map (nearest entry,
fp32 absmax per 256-block). Dequantization: table[code] * (dynamic[qabsmax] * absmax2 + offset).

IR-QLoRA's information calibration quantization (Qin et al., "Accurate LoRA-Finetuning Quantization of LLMs
via Information Retention", arXiv 2402.05445; reference `htqin/IR-QLoRA`, `irqlora.py` `search`), `icq=True`:
each 64-block is shifted by tau before NF4 quantization, tau = tau0 + f * max|w - tau0| with tau0 the
block's median and f searched over linspace(-0.1 sigma, 0.1 sigma, 201) (sigma = 1 / Phi^-1(0.9677083)) for
the largest entropy of the block's 16-bin code histogram; the shift is stored as 8-bit dynamic-map codes of
tau / max|tau| over each 256 blocks, and dequantization adds it back. Where the weight count is not a
multiple of 256 x 64 (SmolLM2's are not), the last group of blocks is shorter (the reference assumes it is).
Shifted blocks cannot use the native table kernels (which scale a fixed table), so they dequantize.

Inference (PyTorch has no NF4 CPU kernel): where llamalab's native kernels are available and the blocks
fall inside rows (the width a multiple of the block, the block a multiple of 32), `prepare()` dequantizes the
absmaxes once (fp32, one per block: +0.5 bit per weight in memory at block 64) and the int4 kernels look the
codes up in a 16-entry table of absmax * NF4 values per block, inside the fused decode step too (see
`llamalab.quant.base`); otherwise the weight is dequantized on the fly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab import kernels
from llamalab.errors import LlamalabError
from llamalab.quant.base import (
    NATIVE_BLOCK,
    NATIVE_DTYPES,
    NO_PERM,
    QuantLinear,
    native_linear,
    register_format,
)
from llamalab.quant.methods import Method, register_method

NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip


def create_normal_map(offset: float = 0.9677083) -> torch.Tensor:
    """bitsandbytes `create_normal_map(offset, use_extra_value=True)`: the NF4 table from normal quantiles."""
    normal = torch.distributions.Normal(0.0, 1.0)
    v1 = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    v3 = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([v1, torch.zeros(1, dtype=torch.float64), v3]).sort().values
    return (v / v.max()).float()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes `create_dynamic_map`: the 256-entry dynamic (exponent + fraction) code."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float64)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = create_dynamic_map()
NF4_SIGMA = 1 / float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9677083, dtype=torch.float64)))


def code_entropy(codes: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Entropy (bits) of the 16-bin histogram of each block's NF4 codes."""
    blocks = codes.view(-1, blocksize).long()
    counts = torch.zeros(blocks.shape[0], 16).scatter_add_(1, blocks, torch.ones(blocks.shape))
    p = counts / blocksize
    return -(p * torch.log2(p.clamp(min=1e-30))).sum(1)


def icq_shifts(
    w: torch.Tensor, blocksize: int = 64, tau_range: float = 0.1, tau_n: int = 100
) -> torch.Tensor:
    """IR-QLoRA's per-block shift tau (n_blocks,) that maximises the entropy of the block's NF4 codes."""
    blocks = w.detach().float().reshape(-1, blocksize)
    tau0 = blocks.median(dim=1).values  # torch's median is the lower one, as the reference's
    spread = (blocks - tau0[:, None]).abs().amax(1)
    best_h = best_f = None
    for f in torch.linspace(
        -tau_range * NF4_SIGMA, tau_range * NF4_SIGMA, 2 * tau_n + 1, dtype=torch.float64
    ):
        tau = float(f) * spread + tau0
        codes, _ = quantize_blockwise(blocks - tau[:, None], NF4_TABLE, blocksize)
        h = code_entropy(codes, blocksize)
        if best_h is None:
            best_h, best_f = h, torch.full_like(h, float(f))
        else:  # a later factor wins only with strictly more entropy
            best_f = torch.where(h > best_h, float(f), best_f)
            best_h = torch.maximum(best_h, h)
    return best_f * spread + tau0


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each element of x (ties to the lower entry): the number of
    midpoints strictly below it, as `torch.bucketize(x, mids)` counts them."""
    mids = (table[1:] + table[:-1]) / 2
    if len(mids) > 15:
        return torch.bucketize(x.contiguous(), mids, right=False).to(torch.uint8)
    # For NF4's 15 midpoints, 15 vectorised passes of compare-and-add beat a binary search per element
    # (ICQ runs this 201 times per weight).
    out = torch.zeros(x.shape, dtype=torch.uint8)
    for m in mids.tolist():
        out += x > m
    return out


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n,) and fp32 absmax per block for a flat tensor (the last block may be partial)."""
    n = x.numel()
    pad = (-n) % block
    xp = torch.nn.functional.pad(x.float().flatten(), (0, pad)).view(-1, block)
    absmax = xp.abs().amax(1)
    codes = nearest_code(xp / absmax.clamp(min=1e-30).unsqueeze(1), table).flatten()[:n]
    return codes, absmax


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.uint8).view(-1, 2)
    return (c[:, 0] << 4) | c[:, 1]


def unpack_nf4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten()


@register_format
class NF4Linear(QuantLinear):
    """NF4 codes (out*in/2 bytes, high nibble first) + per-64 absmax, double-quantized or fp32."""

    format = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        blocksize: int = 64,
        double_quant: bool = True,
        icq: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        n = in_features * out_features
        if n % blocksize or n % 2:
            raise LlamalabError(
                f"nf4: {out_features}x{in_features} weights do not split into blocks of {blocksize}"
            )
        self.blocksize, self.double_quant, self.icq = blocksize, double_quant, icq
        nb = n // blocksize
        self.register_buffer("qweight", torch.zeros(n // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("qabsmax", torch.zeros(nb, dtype=torch.uint8))
            self.register_buffer("absmax2", torch.zeros((nb + 255) // 256))
            self.register_buffer("offset", torch.zeros(1))
        else:
            self.register_buffer("absmax", torch.zeros(nb))
        if icq:  # IR-QLoRA's per-block shift, 8-bit codes with an absmax per 256 blocks
            self.register_buffer("qtau", torch.zeros(nb, dtype=torch.uint8))
            self.register_buffer("tau_absmax", torch.zeros((nb + 255) // 256))
        self.kernel: str | None = None
        self.register_load_state_dict_post_hook(NF4Linear._reprepare)

    def spec(self) -> dict[str, Any]:
        return {"blocksize": self.blocksize, "double_quant": self.double_quant, "icq": self.icq}

    @classmethod
    def from_weight(
        cls,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        blocksize: int = 64,
        double_quant: bool = True,
        icq: bool = False,
    ) -> NF4Linear:
        out_f, in_f = w.shape
        m = cls(in_f, out_f, bias is not None, blocksize, double_quant, icq)
        w = w.detach().float()
        if icq:
            tau = icq_shifts(w, blocksize)
            m.qtau, m.tau_absmax = quantize_blockwise(tau, DYNAMIC_MAP, 256)
            w = (w.reshape(-1, blocksize) - tau[:, None]).reshape(
                w.shape
            )  # the exact shift, as the reference
        codes, absmax = quantize_blockwise(w, NF4_TABLE, blocksize)
        m.qweight = pack_nf4(codes)
        if double_quant:
            offset = absmax.mean()
            q2, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_MAP, 256)
            m.qabsmax, m.absmax2, m.offset = q2, absmax2, offset.view(1)
        else:
            m.absmax = absmax
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def block_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.float()
        nb = self.qabsmax.numel()
        a2 = self.absmax2.float().repeat_interleave(256)[:nb]
        return DYNAMIC_MAP[self.qabsmax.long()] * a2 + self.offset.float()

    def block_shift(self) -> torch.Tensor | None:
        """IR-QLoRA's dequantized per-block shift (None without ICQ)."""
        if not self.icq:
            return None
        return (
            DYNAMIC_MAP[self.qtau.long()]
            * self.tau_absmax.float().repeat_interleave(256)[: self.qtau.numel()]
        )

    def dequantize(self) -> torch.Tensor:
        vals = NF4_TABLE[unpack_nf4(self.qweight).long()].view(-1, self.blocksize)
        w = vals * self.block_absmax().unsqueeze(1)
        shift = self.block_shift()
        if shift is not None:
            w = w + shift.unsqueeze(1)
        return w.view(self.out_features, self.in_features)

    # --- native kernels ---------------------------------------------------------------------------------
    def native_fits(self) -> bool:
        return (
            not self.icq  # the kernels scale the NF4 table per block; a shifted block is not a scaled table
            and self.in_features % self.blocksize == 0
            and self.blocksize % NATIVE_BLOCK == 0
            and self.in_features % NATIVE_BLOCK == 0
        )

    @staticmethod
    def _reprepare(module: NF4Linear, _keys) -> None:
        """The per-row absmax table is derived from the loaded buffers: rebuild it after a state-dict load."""
        module.kernel = None
        module.prepare()

    def prepare(self) -> None:
        if self.kernel is not None or self.qweight.device.type != "cpu" or self.qweight.is_meta:
            return
        if self.native_fits() and kernels.quant_matmul() is not None:
            groups = self.in_features // self.blocksize
            absmax = self.block_absmax().view(self.out_features, groups).contiguous()
            self.register_buffer("absmax_rows", absmax, persistent=False)  # not saved: derived
            self.kernel = "native"

    def native_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes (out, in/2), per-block absmax (out, blocks), the NF4 values) as the native kernels read them,
        or None where they cannot (not prepared, or the model cast to fp16)."""
        if self.kernel != "native" or self.absmax_rows.dtype not in NATIVE_DTYPES:
            return None
        return self.qweight.view(self.out_features, -1), self.absmax_rows, NF4_TABLE

    def native_tensors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The projection as the native decode step reads it (the int4 kernel with an NF4 table), or None."""
        layout = self.native_layout()
        return None if layout is None or self.bias is not None else [*layout, NO_PERM]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            self.prepare()
        tensors = self.native_layout() if x.dtype in NATIVE_DTYPES else None
        y = native_linear(x, *tensors, None, self.in_features) if tensors is not None else None
        if y is None:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


@register_method
class NF4(Method):
    name = "nf4"
    calibrated = False
    kinds: set[str] = set()
    bit_range = (4, 4)
    default_bits = 4
    default_group_size = 64

    def __init__(self, bits: float, group_size: int, **options: Any) -> None:
        super().__init__(bits, group_size, **options)
        if self.group_size <= 0:
            raise LlamalabError(
                "nf4: --group-size is the block size (bitsandbytes uses 64); -1 is not allowed"
            )

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"double_quant": bool(options.pop("double_quant", True))}
        super().check_options(options)
        return out

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> NF4Linear:
        return NF4Linear.from_weight(
            linear.weight, linear.bias, self.group_size, self.options["double_quant"]
        )
