"""Perplexity with the two protocols the literature uses.

- `nonoverlap` (GPTQ, arXiv 2210.17323, `llama.py::llama_eval`; reused by the low-bit LLaMA-3 study,
  arXiv 2404.14047): the token stream is cut into `numel // seq_len` windows of `seq_len` tokens, the last
  partial window is dropped, each window is scored on its own (every token but its first), and
  `ppl = exp(sum of window NLLs / (windows * seq_len))` with window NLL = mean CE x seq_len. Because every
  window has the same length that is exactly exp(mean token NLL), which is what we compute.
- `sliding` (the transformers guide "Perplexity of fixed-length models"): windows of `seq_len` tokens start
  every `stride` tokens; each scores only the tokens no earlier window scored (so each token is predicted
  once, with up to seq_len - stride tokens of left context), the last window may be shorter, and the first
  token of the stream is never predicted. We sum exact per-token NLLs; the guide's code weights each
  window's mean loss by (scored tokens - 1), a small approximation we do not copy (the parity test shows
  the difference it makes).

`chunk_size` runs each window through the KV cache in chunks (see forward.py); the window still starts at
position 0 with an empty cache, so protocols and numbers are unchanged with the dense cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from llamalab.errors import LlamalabError
from llamalab.eval.forward import Forward
from llamalab.model_options import ModelOptions, check_length


@dataclass
class Window:
    begin: int  # first token of the window in the stream
    end: int  # one past its last token
    score_from: int  # first stream position whose token this window predicts (> begin)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # tokens predicted (scored)
    windows: int
    input_tokens: int  # tokens fed through the model
    seconds: float
    tokens_per_s: float  # input tokens per second of model time
    protocol: str
    seq_len: int
    stride: int | None
    chunk_size: int | None
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window

    def metrics(self) -> dict:
        d = asdict(self)
        for key in ("protocol", "seq_len", "stride", "chunk_size", "window_nll"):
            d.pop(key)
        return d


def nonoverlap_windows(n_tokens: int, seq_len: int) -> list[Window]:
    """GPTQ's windows: [i*L, (i+1)*L) for i < n // L, each scoring all tokens but its first."""
    return [Window(i * seq_len, (i + 1) * seq_len, i * seq_len + 1) for i in range(n_tokens // seq_len)]


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The transformers guide's windows: starts every `stride`, each scoring what no earlier one did."""
    if not 1 <= stride <= seq_len:
        raise LlamalabError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(
    llm,
    ids: list[int],
    seq_len: int = 2048,
    stride: int | None = None,
    chunk_size: int | None = None,
    max_windows: int | None = None,
    opts: ModelOptions | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of `llm` on the token stream `ids` (protocol: sliding if `stride` is set, else GPTQ's
    non-overlapping windows). `max_windows` keeps the first K windows; `progress=None` shows a bar on a
    terminal only."""
    if seq_len < 2:
        raise LlamalabError(f"--seq-len must be at least 2, got {seq_len}")
    check_length(llm, seq_len, f"--seq-len {seq_len}")
    if len(ids) < seq_len:
        raise LlamalabError(
            f"the text has {len(ids)} tokens, fewer than one window of {seq_len} (--seq-len); "
            "use more text or a shorter --seq-len"
        )
    windows = sliding_windows(len(ids), seq_len, stride) if stride else nonoverlap_windows(len(ids), seq_len)
    if max_windows is not None:
        if max_windows < 1:
            raise LlamalabError(f"--max-windows must be at least 1, got {max_windows}")
        windows = windows[:max_windows]
    fwd = Forward(llm, opts or ModelOptions(), chunk_size)
    stream = torch.tensor(ids)
    total_nll, total_tokens, window_nll = 0.0, 0, []
    n_input = sum(w.end - w.begin for w in windows)
    bar = tqdm(
        total=n_input,
        unit="tok",
        unit_scale=True,
        desc="ppl",
        disable=None if progress is None else not progress,
    )
    try:
        for w in windows:
            lp, _ = fwd.target_logprobs(stream[None, w.begin : w.end])  # (1, T-1): predicts begin+1..end-1
            scored = lp[0, w.score_from - w.begin - 1 :].double()
            nll = -float(scored.sum())
            total_nll += nll
            total_tokens += scored.numel()
            window_nll.append(nll / scored.numel())
            bar.update(w.end - w.begin)
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    finally:
        bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        tokens=total_tokens,
        windows=len(windows),
        input_tokens=n_input,
        seconds=fwd.seconds,
        tokens_per_s=n_input / fwd.seconds if fwd.seconds else 0.0,
        protocol="sliding" if stride else "nonoverlap",
        seq_len=seq_len,
        stride=stride,
        chunk_size=chunk_size,
        window_nll=window_nll,
    )
