"""FlashBack: appending keeps the context's cached keys and values (only the new tokens and the document are
computed); prepending recomputes everything; both generate what a fresh engine generates from the same
prompts."""

from __future__ import annotations

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.longctx.flashback import RetrievalLM


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    import llamalab

    return llamalab.load(str(tiny_dir))


def docs_for(llm):
    texts = ["The lighthouse was red.", "Bread is sold at dawn.", "Qubits hold superpositions."]
    ids = [llm.encode(t, add_special_tokens=False) for t in texts]
    return lambda query: ids[sum(query) % len(ids)]  # a deterministic "retriever" of the query


def test_appending_reuses_the_context_cache(tiny_llm):
    context = torch.randint(5, 300, (120,)).tolist()
    lm = RetrievalLM(tiny_llm, docs_for(tiny_llm), "append", stride=4, max_len=256)
    first = lm.generate(context, 4)  # one retrieval
    cache = lm.engine.cache
    kept = [t[0, :, :120].clone() for t in cache.k]
    result = lm.generate(context, 12)  # three retrievals, each on top of the same context
    assert [s["reused"] >= 120 for s in result.steps] == [True] * 3
    assert all(torch.equal(t[0, :, :120], k) for t, k in zip(cache.k, kept))  # the context's rows untouched
    assert result.tokens[:4] == first.tokens
    # The same prompts through a fresh engine each time (no reuse) give the same tokens.
    fresh = []
    for step in range(3):
        x = context + result.tokens[: 4 * step]
        prompt = lm.prompt(x, docs_for(tiny_llm)(x[-32:]))
        fresh += tiny_llm.generate_sequences([prompt], max_new_tokens=4, ignore_eos=True)[0].output_ids
    assert result.tokens == fresh


def test_prepending_recomputes_the_context(tiny_llm):
    context = torch.randint(5, 300, (120,)).tolist()
    docs = [tiny_llm.encode(t, add_special_tokens=False) for t in ("One doc.", "Another one.", "A third.")]
    calls = iter(range(3))
    lm = RetrievalLM(tiny_llm, lambda query: docs[next(calls)], "prepend", stride=4, max_len=256)
    result = lm.generate(context, 12)  # a new document leads every prompt: nothing after it is reusable
    assert result.retrievals == 3 and sum(s["reused"] for s in result.steps) < 3 * 5
    assert result.prefilled > 3 * 120


def test_bad_mode(tiny_llm):
    with pytest.raises(LlamalabError, match="append, prepend"):
        RetrievalLM(tiny_llm, docs_for(tiny_llm), "insert")
