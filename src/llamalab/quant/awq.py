"""AWQ: activation-aware weight quantization (scale search, clip search, scales folded into the model).

Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", arXiv 2306.00978. Reference code: mit-han-lab/llm-awq
`awq/quantize/{pre_quant,auto_scale,auto_clip,quantizer}.py`.

Reproduced as in `run_awq`, block by block:
- inputs of every linear are captured on the *float* block, and the next block sees the float block's
  outputs (the reference computes `inps = layer(inps)` before scaling; AWQ does not propagate quantized
  outputs);
- scale search (`auto_scale_block`) for the LLaMA pairs input_layernorm -> [q,k,v] (inspecting self_attn),
  v_proj -> [o_proj] **only if v_proj and o_proj have the same shape (skipped under GQA, as for SmolLM2 and
  LLaMA3)**, post_attention_layernorm -> [gate,up] (inspecting mlp), up_proj -> [down_proj]: x_mean = mean |x|
  per input channel, for ratio in {0, 0.05, ..., 0.95}: s = x_mean^ratio clamped >= 1e-4, s /= sqrt(max s *
  min s), W' = Q(W * s) / s, loss = MSE of the inspected module's output; all searches on the original
  weights, then applied: previous norm weight (or previous linear's output rows) divided by s, the linears'
  input columns multiplied by s, cached inputs divided by s;
- clip search (`auto_clip_block`) for every linear except q/k: per (output row, group), max_val = amax |w| x
  (1 - i/20) for i < 10, error = mean over 512 subsampled tokens of the squared per-group partial-dot-product
  error; weights clamped to the best range;
- final round-to-nearest with the AWQ quantizer (asymmetric min-max, zero point, `scale >= 1e-5`).
Defaults: 4 bits, group 128 (on SmolLM2's 576-wide layers use 64: 128 does not divide 576). The reference
calibrates on 128 Pile-val lines of <= 512 tokens; offline we use the shipped text (recorded), 16 x 512 by
default. Option `search_samples`: measure each candidate's loss on the first k windows only (mean |x| still
uses every token); the study uses 4 to fit 2 CPU cores. Default: all windows, as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.model.modules import set_module
from llamalab.quant.base import UniformQuantLinear
from llamalab.quant.calib import BlockContext, Stats
from llamalab.quant.methods import Method, register_method
from llamalab.quant.quantizer import affine_params, fake_quantize, group_affine, single_thread


def awq_fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """llm-awq `pseudo_quantize_tensor` (zero point on) on (rows, cols), groups along cols."""
    rows, cols = w.shape
    g = cols if group_size <= 0 else group_size
    wg = w.float().reshape(-1, g)
    return fake_quantize(wg, affine_params(wg, bits, False, "minmax")).reshape(rows, cols).to(w.dtype)


@torch.no_grad()
def search_scale(
    linears: list[nn.Linear],
    x_mean: torch.Tensor,
    inspect: Callable[[], torch.Tensor],
    bits: int,
    group_size: int,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """`_search_module_scale`: the ratio whose scales minimise the inspected output's MSE. Returns (scales,
    best ratio, loss per ratio); the linears' weights are restored."""
    originals = [lin.weight.detach().clone() for lin in linears]
    org_out = inspect()
    best, best_ratio, best_scales, history = float("inf"), -1.0, None, []
    try:
        for r in range(n_grid):
            ratio = r / n_grid
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for lin, w0 in zip(linears, originals):
                lin.weight.data.copy_(
                    awq_fake_quant(w0 * scales.view(1, -1), bits, group_size) / scales.view(1, -1)
                )
            loss = float((org_out - inspect()).float().pow(2).mean())
            history.append(loss)
            if loss < best:
                best, best_ratio, best_scales = loss, ratio, scales.clone()
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.data.copy_(w0)
    return best_scales, best_ratio, history


@torch.no_grad()
def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
    n_sample_token: int = 512, oc_batch: int = 64,
) -> torch.Tensor:  # fmt: skip
    """`auto_clip_layer`: best max |w| per (output row, group) -> (rows, n_groups, 1).

    The reference forms the per-group partial dot products as a broadcast product summed over the group
    (a (rows, tokens, groups, g) tensor per candidate); we compute the same sums as one batched matmul per
    candidate (groups x (tokens, g) @ (g, rows)), which on a CPU is ~20x faster and equal up to float
    summation order."""
    rows, cols = w.shape
    g = cols if group_size <= 0 else group_size
    n_groups = cols // g
    x = x.reshape(-1, cols).float()
    x = x[0 :: max(1, x.shape[0] // n_sample_token)]
    xg = x.view(-1, n_groups, g).transpose(0, 1)  # (n_groups, tokens, g)
    w_all = w.float().reshape(rows, n_groups, g)
    best_all = []
    for b in range(0, rows, oc_batch):
        wb = w_all[b : b + oc_batch]  # (co, n_groups, g)
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # (co, n_groups, 1)
        best_max = org_max.clone()
        min_errs = torch.full_like(org_max, float("inf"))
        org_out = torch.bmm(xg, wb.permute(1, 2, 0))  # (n_groups, tokens, co)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur_w = torch.clamp(wb, -max_val, max_val)
            q_w = awq_fake_quant(cur_w.reshape(-1, g), bits, -1).reshape(cur_w.shape)
            out = torch.bmm(xg, q_w.permute(1, 2, 0))
            err = (out - org_out).pow(2).mean(dim=1).T.unsqueeze(-1)  # (co, n_groups, 1)
            better = err < min_errs
            min_errs[better] = err[better]
            best_max[better] = max_val[better]
        best_all.append(best_max)
    return torch.cat(best_all)  # (rows, n_groups, 1)


@register_method
class AWQ(Method):
    name = "awq"
    kinds = {"inputs"}
    propagate = "float"
    bit_range = (2, 8)
    default_bits = 4
    default_group_size = 128
    default_calib = {"nsamples": 16, "seq_len": 512, "seed": 0}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {
            "n_grid": int(options.pop("n_grid", 20)),
            "clip": bool(options.pop("clip", True)),
            "search_samples": options.pop("search_samples", None),
        }
        if out["search_samples"] is not None and int(out["search_samples"]) < 1:
            raise LlamalabError(f"awq: search_samples must be at least 1, not {out['search_samples']}")
        super().check_options(options)
        return out

    def process_block(
        self,
        i: int,
        block: nn.Module,
        x: torch.Tensor,
        fp_out: torch.Tensor,
        stats: dict[str, Stats],
        ctx: BlockContext,
    ) -> None:
        bits, G, n_grid = int(self.bits), self.group_size, self.options["n_grid"]
        groups = block.linear_groups()
        feats = {g.linears[0]: stats[g.linears[0]].all_inputs() for g in groups}
        n, L = x.shape[:2]
        # The loss of each candidate is measured on the first `search_samples` windows (all by default);
        # mean |x| always uses every calibration token.
        ns = min(n, int(self.options["search_samples"] or n))

        def sub(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, L, -1)[:ns].reshape(ns * L, -1)

        def inspector(module: nn.Module, xin: torch.Tensor) -> Callable:
            xs = sub(xin)
            if isinstance(module, nn.Linear):
                return lambda: module(xs)
            return lambda: ctx.run(module, xs.view(ns, L, -1).to(x.dtype))

        pairs: list[tuple[str, Any, list[nn.Linear], list[str], torch.Tensor, Callable]] = []
        for g in groups:
            prev, lins = block.get_submodule(g.input_op), [block.get_submodule(name) for name in g.linears]
            # A preceding linear can absorb the scales only when its outputs are the group's inputs (v -> o
            # without grouped-query attention), as the reference checks by shape.
            if isinstance(prev, nn.Linear) and prev.out_features != lins[0].in_features:
                continue
            label = "_".join(name.rpartition(".")[2].removesuffix("_proj") for name in g.linears)
            xin = feats[g.linears[0]]
            pairs.append(
                (label, prev, lins, [g.linears[0]], xin, inspector(block.get_submodule(g.inspect), xin))
            )

        found = []
        for label, prev, lins, feat_names, xin, inspect in pairs:
            x_mean = xin.abs().mean(0)
            scales, ratio, _ = search_scale(lins, x_mean, inspect, bits, G, n_grid)
            found.append((prev, lins, feat_names, scales))
            self.layer_log.setdefault(f"model.layers.{i}", {})[f"ratio_{label}"] = ratio
        for prev, lins, feat_names, scales in found:  # apply_scale
            if isinstance(prev, nn.Linear):
                prev.weight.data[-scales.numel() :].div_(scales.view(-1, 1))
            else:
                prev.weight.data.div_(scales)
            for lin in lins:
                lin.weight.data.mul_(scales.view(1, -1))
            for fname in feat_names:
                feats[fname].div_(scales.view(1, -1))
        # Every linear but the query and key projections is clipped (the reference skips "q_" and "k_": their
        # outputs meet only in attention scores), against its group's (scaled) inputs.
        clip_inputs = {
            name: feats[g.linears[0]]
            for g in groups
            for name in g.linears
            if not name.rpartition(".")[2].startswith(("q_", "k_"))
        }
        if self.options["clip"]:
            with single_thread():
                clips = {
                    name: search_clip(block.get_submodule(name).weight, xin, bits, G, n_grid)
                    for name, xin in clip_inputs.items()
                }
            for name, max_val in clips.items():
                w = block.get_submodule(name).weight.data
                g = w.shape[1] if G <= 0 else G
                wg = w.view(w.shape[0], -1, g)
                wg.copy_(torch.clamp(wg, -max_val.to(w.dtype), max_val.to(w.dtype)))
        for name in block.linear_names():
            lin = block.get_submodule(name)
            q, s, z = group_affine(lin.weight.detach(), bits, G, False, "minmax")
            set_module(block, name, UniformQuantLinear.from_codes(q, s, z, bits, G, lin.bias))
