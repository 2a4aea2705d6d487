"""Generation through the engine with a KV method, for comparing a method with its slow reference."""

from __future__ import annotations


def run_rows(llm, spec, prompts, n: int, max_len: int = 96, chunk: int = 8):
    """Greedy answers of `n` tokens for `prompts` in one batch (rows at different lengths, prefilled in
    chunks of `chunk` tokens), in prompt order, and the engine (its cache holds the final state)."""
    engine = llm.engine(max_batch=len(prompts), max_len=max_len, kv=spec, prefill_chunk=chunk)
    done = {}
    for event in engine.run(prompts, [llm.sampling(max_new_tokens=n, ignore_eos=True) for _ in prompts]):
        if event.finished:
            done[len(event.seq.prompt_ids)] = event.seq.output_ids
    return [done[len(p)] for p in prompts], engine
