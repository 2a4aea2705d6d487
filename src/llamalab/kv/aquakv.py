"""AQUA-KV: "Cache Me If You Must: Adaptive Key-Value Quantization for Large Language Models" (Shutova et
al., ICML 2025, arXiv 2501.19392); reference code goodevening13/aquakv (`aquakv/cache_utils.py`,
`aquakv/quantizers.py`, `train_predictors.py`).

What is reproduced:
- keys and values handled *before RoPE* (our seam hands them over unrotated; RoPE is applied when they are
  read, at their positions, with the model's own tables), each token's heads flattened into one vector;
- per layer l >= 1, linear predictors (`parts/predictors.py`, fitted by `llamalab kv calibrate`): keys from
  the previous layer's *reconstructed* keys, values from [this layer's reconstructed keys, the previous
  layer's reconstructed values]; only the residual (target - prediction) is quantized, with HIGGS
  (`parts/higgs.py`: Hadamard rotation, norm scale, nearest point of a Gaussian-optimal grid);
  reconstruction = prediction + dequantized residual, layer after layer;
- layer 0 has no predictor and is quantized directly at 4 bits (grid d=2, n=256);
- the first 4 tokens (attention sinks) stay in full precision (`TreatPrefixSeparately(prefix_size=4)`),
  and recent tokens gather in a full-precision buffer until at least 128 of them are there
  (`PredictorHiggsCache(min_buffer_size=128)`), then the whole buffer is quantized as one write-once chunk,
  layer by layer in order, during the pass that filled it;
- a pass attends over its own tokens and the buffer exactly and over the reconstructed quantized past.

Deviations: the HIGGS group is the whole token vector where it has a Hadamard order (192 = 12 x 16 for
SmolLM2), not a zero-padded 1024 (see `parts/higgs.py`); scales are stored in fp16 (the paper's accounting).
The reference rebuilds every past chunk through the predictors on every pass; so do we, one layer at a time
(the transient is one layer's past, never a dense copy of the cache), which makes decode cost grow with the
context times C^2 per layer: fast kernels are future work in the paper too ("Efficient inference kernels
are TBU"). `--kv higgs` is the same cache without predictors (plain HIGGS), the paper's ablation baseline.
"""

from __future__ import annotations

import torch

from llamalab.errors import ContextLengthError, LlamalabError
from llamalab.kv.base import KVCache
from llamalab.kv.parts.attend import attend_over
from llamalab.kv.parts.hadamard import is_hadamard_order
from llamalab.kv.parts.higgs import Higgs, grid_for_bits
from llamalab.kv.parts.predictors import Predictors
from llamalab.kv.registry import CacheSpec, register_kv_cache
from llamalab.model.rope import apply_rope, rope_cos_sin, rope_frequencies

SINKS = 4
BUFFER = 128
FIRST_LAYER_BITS = 4.0
GRID_DIM = 2


def default_group(width: int) -> int:
    """The HIGGS group for a token vector of `width` values: the largest divisor of it up to 1024 that is a
    Hadamard order (1024 where the reference's default fits, the whole vector for narrower models)."""
    for g in range(min(width, 1024), 0, -1):
        if width % g == 0 and is_hadamard_order(g):
            return g
    return 1


class AquaKVCache(KVCache):
    """Predictor + residual HIGGS quantized KV cache (see the module docstring)."""

    def __init__(
        self, config, max_len, max_batch, predictors, quantizer, first, sinks, buffer, dtype, device
    ):
        self.max_batch, self.max_len = max_batch, max_len
        self.predictors, self.quantizer, self.first = predictors, quantizer, first
        self.sinks, self.buffer, self.dtype = sinks, buffer, dtype
        self.n_layers = config.num_hidden_layers
        H, D = config.num_key_value_heads, config.head_dim
        self.H, self.D, self.C = H, D, H * D
        # The model rotates a cached sequence for the cache's length (dynamic NTK and LongRoPE depend on it);
        # past keys re-rotated here must match, or queries and keys disagree past L0.
        self.inv_freq, self.attention_factor = rope_frequencies(config, max_len)
        cap = max(0, max_len - sinks)
        self.codes, self.scales = [], []  # per layer: (keys, values), each (B, cap, bytes) / (B, cap, groups)
        for layer in range(self.n_layers):
            q = first if layer == 0 else quantizer
            codes = [
                torch.zeros(max_batch, cap, q.code_bytes, dtype=torch.uint8, device=device) for _ in "kv"
            ]
            scales = [
                torch.zeros(max_batch, cap, q.n_groups, dtype=torch.float16, device=device) for _ in "kv"
            ]
            self.codes.append(codes)
            self.scales.append(scales)
        # full precision, before RoPE: slots [0, sinks) the sinks, then the buffer (< `buffer` between passes)
        slots = sinks + buffer
        self.fp = [
            [torch.zeros(max_batch, H, slots, D, dtype=dtype, device=device) for _ in "kv"]
            for _ in range(self.n_layers)
        ]
        self.length = [0] * max_batch
        self.q_end = [sinks] * max_batch  # the quantized positions of a row are [sinks, q_end)
        self._plan: dict[int, tuple[int, int]] = {}  # row -> (q_end before this pass, after)
        self._past: tuple[torch.Tensor, torch.Tensor] | None = None  # layer l-1's rebuilt quantized past
        self._flushed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> layer l-1's new chunk

    # --- the seam -----------------------------------------------------------------------------------

    def attend(self, layer, q, k, v, ctx, attention):
        rows, starts, T = ctx.rows, ctx.starts, k.shape[2]
        if layer == 0:
            self._begin(rows, starts, T)
        past_k, past_v = self._rebuild(layer, rows, starts)
        out = attend_over(ctx.rotate(q), ctx.rotate(k), v, past_k, past_v, starts, attention)
        self._write(layer, rows, starts, k, v)
        if layer == self.n_layers - 1:
            for r, s in zip(rows, starts):
                self.length[r], self.q_end[r] = s + T, self._plan[r][1]
            self._plan, self._past, self._flushed = {}, None, {}
        return out

    def _begin(self, rows, starts, T) -> None:
        """Decide at layer 0, as the reference does, which rows quantize their buffer in this pass."""
        for r, s in zip(rows, starts):
            if self.length[r] != s:
                raise LlamalabError(f"AQUA-KV appends in order: row {r} holds {self.length[r]}, not {s}")
            if s + T > self.max_len:
                raise ContextLengthError(f"sequence reaches beyond the cache's {self.max_len} positions")
            q_end = self.q_end[r]
            buffered = max(0, s + T - q_end)  # tokens after the sinks and the quantized part
            self._plan[r] = (q_end, s + T if buffered >= self.buffer else q_end)

    # --- reading ------------------------------------------------------------------------------------

    def _rebuild(self, layer, rows, starts):
        """Past keys (rotated) and values of `rows` at positions 0..max(starts)-1 (B, H, P, D)."""
        P = max(starts)
        if P == 0:
            return None, None
        B, H, D, S = len(rows), self.H, self.D, self.sinks
        keys = self.fp[layer][0].new_zeros(B, H, P, D)
        values = torch.zeros_like(keys)
        n_s = min(S, P)
        keys[:, :, :n_s] = self.fp[layer][0][rows, :, :n_s]
        values[:, :, :n_s] = self.fp[layer][1][rows, :, :n_s]
        n_q = max(self._plan[r][0] for r in rows) - S
        if n_q > 0:
            rk, rv = self.reconstruct(layer, rows, n_q)  # (B, n_q, C), fp32
            keys[:, :, S : S + n_q] = _split_heads(rk, H).to(keys.dtype)
            values[:, :, S : S + n_q] = _split_heads(rv, H).to(keys.dtype)
        for b, (r, s) in enumerate(zip(rows, starts)):
            q_end = self._plan[r][0]
            if s > q_end:  # this row's buffer, in slots after the sinks
                keys[b, :, q_end:s] = self.fp[layer][0][r, :, S : S + s - q_end]
                values[b, :, q_end:s] = self.fp[layer][1][r, :, S : S + s - q_end]
        positions = torch.arange(P, device=keys.device)[None]
        cos, sin = rope_cos_sin(self.inv_freq.to(keys.device), positions, self.attention_factor, keys.dtype)
        return apply_rope(keys, cos, sin), values

    def reconstruct(self, layer: int, rows: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values (B, n, C) of the first n quantized positions of `rows` at `layer`;
        layer l reuses layer l-1's result from the same pass as its predictors' input."""
        q = self.first if layer == 0 else self.quantizer
        ck, cv = (c[rows, :n] for c in self.codes[layer])
        sk, sv = (s[rows, :n] for s in self.scales[layer])
        rk, rv = q.dequantize(ck, sk), q.dequantize(cv, sv)
        if layer > 0 and self.predictors is not None:
            prev_k, prev_v = self._past
            rk = rk + self.predictors.predict_keys(layer, prev_k[:, :n])
            rv = rv + self.predictors.predict_values(layer, rk, prev_v[:, :n])
        self._past = (rk, rv)
        return rk, rv

    # --- writing ------------------------------------------------------------------------------------

    def _write(self, layer, rows, starts, k, v) -> None:
        S, T = self.sinks, k.shape[2]
        fk, fv = self.fp[layer]
        for b, (r, s) in enumerate(zip(rows, starts)):
            n_sink = max(0, min(S, s + T) - s)  # new tokens that are sinks
            if n_sink:
                fk[r, :, s : s + n_sink] = k[b, :, :n_sink]
                fv[r, :, s : s + n_sink] = v[b, :, :n_sink]
            q_end, new_end = self._plan[r]
            first = s + n_sink  # position of the first new token after the sinks
            if new_end == q_end:  # no flush: the new tokens join the buffer
                if first < s + T:
                    fk[r, :, S + first - q_end : S + s + T - q_end] = k[b, :, n_sink:]
                    fv[r, :, S + first - q_end : S + s + T - q_end] = v[b, :, n_sink:]
                continue
            # flush: the buffered tokens and this pass's become one quantized chunk [q_end, s + T)
            n_buf = max(0, s - q_end)
            xk = torch.cat([fk[r, :, S : S + n_buf], k[b, :, n_sink:]], 1)  # (H, n, D)
            xv = torch.cat([fv[r, :, S : S + n_buf], v[b, :, n_sink:]], 1)
            self._quantize_chunk(layer, r, q_end - S, _join_heads(xk), _join_heads(xv))

    def _quantize_chunk(self, layer: int, r: int, at: int, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Quantize a chunk (n, C) of row r at quantized index `at`: layer 0 directly, layer l the residual
        of its predictions from layer l-1's reconstruction of the same chunk (kept in `_flushed`)."""
        q = self.first if layer == 0 else self.quantizer
        xk, xv = xk.float(), xv.float()
        pk = pv = None
        if layer > 0 and self.predictors is not None:
            prev_k, prev_v = self._flushed[r]
            pk = self.predictors.predict_keys(layer, prev_k)
        ck, sk = q.quantize(xk if pk is None else xk - pk)
        rk = q.dequantize(ck, sk) + (0 if pk is None else pk)
        if layer > 0 and self.predictors is not None:
            pv = self.predictors.predict_values(layer, rk, prev_v)
        cv, sv = q.quantize(xv if pv is None else xv - pv)
        rv = q.dequantize(cv, sv) + (0 if pv is None else pv)
        n = xk.shape[0]
        (codes_k, codes_v), (scales_k, scales_v) = self.codes[layer], self.scales[layer]
        codes_k[r, at : at + n], scales_k[r, at : at + n] = ck, sk
        codes_v[r, at : at + n], scales_v[r, at : at + n] = cv, sv
        self._flushed[r] = (rk, rv)

    # --- bookkeeping ----------------------------------------------------------------------------------

    def nbytes(self) -> int:
        tensors = [t for layer in self.codes + self.scales + self.fp for t in layer]
        return sum(t.numel() * t.element_size() for t in tensors)

    def predictor_bytes(self) -> int:
        """Bytes of the predictors (shared by every sequence; reported apart from the cache, as the paper)."""
        if self.predictors is None:
            return 0
        tables = list(self.predictors.key.values()) + list(self.predictors.value.values())
        return sum(t.numel() * t.element_size() for pair in tables for t in pair)

    def reset(self, rows=None) -> None:
        for r in range(self.max_batch) if rows is None else rows:
            self.length[r], self.q_end[r] = 0, self.sinks


def _join_heads(x: torch.Tensor) -> torch.Tensor:
    """(H, n, D) -> (n, H*D): a token's heads side by side, as the reference's `combine_heads`."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _split_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, n, H*D) -> (B, H, n, D)."""
    B, n, C = x.shape
    return x.reshape(B, n, H, C // H).transpose(1, 2)


def _int_arg(spec: CacheSpec, key: str, default: int) -> int:
    try:
        return int(spec.args.get(key, default))
    except ValueError:
        raise LlamalabError(f"--kv-arg {key}={spec.args[key]!r} is not an integer") from None


def build(spec: CacheSpec, config, max_len, max_batch, dtype, device, predictors: Predictors | None):
    """The cache for `spec` with `predictors` (None: plain HIGGS), checking its settings against theirs."""
    meta = predictors.meta if predictors is not None else {}
    C = config.num_key_value_heads * config.head_dim
    d = _int_arg(spec, "dim", meta.get("grid_dim", GRID_DIM))
    bits = spec.bits if spec.bits is not None else meta.get("bits", 2.0)
    group = spec.group_size or meta.get("group_size") or default_group(C)
    fitted_with = (
        ("--kv-bits", bits, "bits"),
        ("--kv-group-size", group, "group_size"),
        ("--kv-arg dim", d, "grid_dim"),
    )
    for name, given, key in fitted_with:
        if key in meta and float(given) != float(meta[key]):
            raise LlamalabError(
                f"{name} {given:g} differs from the {meta[key]:g} the predictors in {spec.predictors} were "
                "fitted with; leave it unset or calibrate predictors with that setting"
            )
    quantizer = Higgs(C, group, d, grid_for_bits(float(bits), d))
    first = Higgs(C, group, GRID_DIM, grid_for_bits(FIRST_LAYER_BITS, GRID_DIM))
    sinks, buffer = _int_arg(spec, "sinks", SINKS), _int_arg(spec, "buffer", BUFFER)
    if sinks < 0 or buffer < 1:
        raise LlamalabError("--kv-arg sinks must be >= 0 and --kv-arg buffer >= 1")
    return AquaKVCache(config, max_len, max_batch, predictors, quantizer, first, sinks, buffer, dtype, device)


SETTINGS = ("bits", "group_size", "dim", "sinks", "buffer")


@register_kv_cache("aquakv")
def aquakv_cache(spec: CacheSpec, config, max_len: int, max_batch: int, dtype, device) -> AquaKVCache:
    """AQUA-KV: inter-layer linear predictors + HIGGS-quantized residuals (needs --kv-predictors FILE)."""
    spec.refuse_settings(accepted=(*SETTINGS, "predictors"))
    if not spec.predictors:
        raise LlamalabError(
            "--kv aquakv needs --kv-predictors FILE; make one with "
            "`llamalab kv calibrate --model MODEL --method aquakv --out FILE`"
        )
    predictors = Predictors.load(spec.predictors)
    predictors.check_model(config, spec.predictors)
    return build(spec, config, max_len, max_batch, dtype, device, predictors)
