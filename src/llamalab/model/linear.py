"""The model's linear layer: the unit the Linear-swap seam (quantization, LoRA) replaces."""

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels


class Linear(nn.Linear):
    """`nn.Linear` with a faster path for a single row (batch-1 decode).

    On CPU, `torch.mv` reads a row-major fp32 weight at close to memory bandwidth, where the (1, d) x (d, n)
    matmul that `F.linear` dispatches to is up to 2x slower (measured in BENCHMARKS.md). For bf16 weights
    torch.mv is slower still, so a native kernel (`llamalab.kernels`, where the CPU has AVX512-BF16) runs
    those; it builds no autograd graph, hence only when no gradient can flow to the weight.
    Quantization and LoRA replace these modules through the Linear-swap seam.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and not x.requires_grad and x.device.type == "cpu":
            w, v = self.weight, x.reshape(-1)
            native = (
                w.dtype == x.dtype == torch.bfloat16
                and w.is_contiguous()
                and not (w.requires_grad and torch.is_grad_enabled())
            )
            gemv = kernels.gemv_bf16() if native else None
            y = torch.mv(w, v) if gemv is None else gemv(w, v)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class FusedLinears:
    """Linear layers that read the same input (q/k/v, gate/up), run as one matmul at inference.

    The modules stay in the model under their HF names (for loading, saving, quantization and LoRA); their
    weights become views into one concatenated tensor, so fusing costs no memory. When any of them has been
    swapped for another module, re-assigned, or gradients are needed, the modules run one by one instead.
    """

    def __init__(self, *linears: Linear) -> None:
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.data for m in linears])
        has_bias = all(m.bias is not None for m in linears)
        self.bias = torch.cat([m.bias.data for m in linears]) if has_bias else None
        for m, w in zip(linears, self.weight.split(self.sizes)):
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if has_bias:
            for m, b in zip(linears, self.bias.split(self.sizes)):
                m.bias = nn.Parameter(b, requires_grad=m.bias.requires_grad)
        self._ptrs = [m.weight.data_ptr() for m in linears]

    def intact(self, modules: tuple[nn.Module, ...]) -> bool:
        """Whether `modules` (the model's current ones) are still the fused ones, on the fused weight."""
        return (
            all(m is f for m, f in zip(modules, self.linears))
            and [m.weight.data_ptr() for m in modules] == self._ptrs
        )

    def __call__(self, x: torch.Tensor, modules: tuple[nn.Module, ...]) -> torch.Tensor:
        """The outputs of `modules` (the model's current ones) on `x`, concatenated on the last dim."""
        if not self.intact(modules) or (torch.is_grad_enabled() and x.requires_grad):
            return torch.cat([m(x) for m in modules], dim=-1)
        return Linear.forward(self, x)  # type: ignore[arg-type]
