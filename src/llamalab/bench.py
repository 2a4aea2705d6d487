"""`llamalab bench`: prefill and decode throughput of a loaded model, llama-bench style (pp512 / tg128).

Decode at batch 1 is memory-bound: every weight is read once per token, so we also report the bandwidth
achieved (bytes of weights read per token x tokens/s, gpt-fast's metric). With a tied head the whole
embedding matrix is read by the head each step (once, also where a GGUF file run as stored shares its
quantized table between the two); an untied embedding is only looked up (one row).

Memory: `peak_rss_mb` is the process's high-water mark (the model's load included); `run_peak_mb` is how far
the rounds themselves raised resident memory above where it stood before them (cache, prefill activations and
any dequantized temporaries), where Linux lets the high-water mark be reset (/proc/self/clear_refs), else
None; `kv_cache_mb` is the cache's bytes measured from its tensors.
"""

from __future__ import annotations

import ctypes
import dataclasses
import resource
import time
from pathlib import Path
from typing import Any

import torch

from llamalab.data import sample_text
from llamalab.generate.sampling import SamplingParams


def bench_tokens(llm, n: int) -> list[int]:
    """`n` tokens of real text (repeated if the text is shorter)."""
    ids = llm.encode(sample_text(), add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def quantized_formats(model) -> list[str]:
    """The formats of the model's quantized layers, e.g. ['gguf qtype=Q4_1', 'gguf qtype=Q8_0'] (none: [])."""
    from llamalab.quant.base import QuantLinear

    found = {
        " ".join([m.format, *(f"{k}={v}" for k, v in m.spec().items())])
        for m in model.modules()
        if isinstance(m, QuantLinear)
    }
    return sorted(found)


def decode_bytes_per_token(model) -> int:
    """Bytes of weights read to decode one token: the embedding only counts where the head reads it (tied,
    as a parameter or as the same quantized module)."""
    head = {t.data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    emb = model.model.embed_tokens
    looked_up = {t.data_ptr(): t for t in [*emb.parameters(), *emb.buffers()] if t.data_ptr() not in head}
    return model.weight_bytes() - sum(t.numel() * t.element_size() for t in looked_up.values())


def bench_model(
    llm, prompt_tokens: int = 512, new_tokens: int = 128, batch: int = 1, repeats: int = 3
) -> dict:
    """Best-of-`repeats` prefill and decode throughput. Prefill is every prompt's chunks (the engine's, 512
    tokens), all before any decode step; each round uses a fresh engine, so no prefix is reused."""
    ids = bench_tokens(llm, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prefill, decode = [], []
    before = _reset_peak_rss()
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up allocators and kernels
            engine = llm.engine(max_batch=batch, max_len=prompt_tokens + new_tokens + 1)
            prefill_s, decode_s, steps = prefill_then_decode(engine, [ids] * batch, params)
            prefill.append(batch * prompt_tokens / prefill_s)
            decode.append(batch * steps / decode_s)
    run_peak = None if before is None else _status_kb("VmHWM") - before
    best_decode = max(decode[1:])
    per_token = decode_bytes_per_token(llm.model)
    return {
        "model": llm.name,
        "dtype": str(llm.dtype).replace("torch.", ""),
        "quantized": quantized_formats(llm.model),
        "kv": llm.kv.method,
        "decode_path": engine.decode_path,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": round(max(prefill[1:]), 2),
        "decode_tokens_per_s": round(best_decode, 2),
        "weight_bytes_per_token": per_token,
        "decode_gb_per_s": round(per_token * best_decode / batch / 1e9, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "run_peak_mb": None if run_peak is None else round(run_peak / 1024, 1),
        "kv_cache_mb": round(engine.cache.nbytes() / 1e6, 2),
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int | None:
    """Reset this process's resident high-water mark to its current RSS (Linux: writing 5 to
    /proc/self/clear_refs) and return that RSS in kB; None where that is not possible.

    First the C allocator hands its free memory back to the system (glibc's malloc_trim): loading a model
    frees large temporaries whose pages stay resident in the heap, and later allocations that reuse them
    would not raise RSS at all (a dense cache of 94 MB measured as 16 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then undercount
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return None


def prefill_then_decode(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float, int]:
    """Add every prompt to `engine`, prefill them all (its chunks) before any decode step, then decode until
    every sequence is done: (prefill seconds, decode seconds, decode steps)."""
    t0 = time.perf_counter()
    for ids in prompts:
        engine.add(ids, dataclasses.replace(params))
    while engine.prefilling:
        engine.step(decode=False)
    t1 = time.perf_counter()
    steps = 0
    while engine.active:
        engine.step()
        steps += 1
    return t1 - t0, time.perf_counter() - t1, steps


def decode_argmax(llm, prompt: list[int], forced: list[int]) -> list[int]:
    """Our argmax at each position of `forced` after `prompt`, fed one token at a time through the KV cache,
    so every product is a one-row decode product (the path a decode step takes, integer or exact)."""
    cache = llm.kv.make(llm.model.config, len(prompt) + len(forced), 1, llm.dtype, llm.device)
    with torch.inference_mode():
        logits = llm.model(torch.tensor([prompt]), positions=0, cache=cache, last_only=True)
        tops = [int(logits[0, -1].argmax())]
        for i, tok in enumerate(forced[:-1]):
            logits = llm.model(torch.tensor([[tok]]), positions=[len(prompt) + i], cache=cache)
            tops.append(int(logits[0, -1].argmax()))
    return tops


def format_bench(r: dict[str, Any]) -> str:
    return (
        f"{r['model']} {r['dtype']}{' + ' + ', '.join(r['quantized']) if r['quantized'] else ''} "
        f"threads={r['threads']} batch={r['batch']}: "
        f"prefill pp{r['prompt_tokens']} {r['prefill_tokens_per_s']:.1f} tok/s | "
        f"decode tg{r['new_tokens']} {r['decode_tokens_per_s']:.1f} tok/s "
        f"({r['decode_gb_per_s']:.1f} GB/s of weights) | peak RSS {r['peak_rss_mb']:.0f} MB | "
        f"kv {r['kv']}, decode path {r['decode_path']}"
    )
