"""The grammar mask itself: which tokens it allows, and that following it yields schema-valid JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.serve.constrained import GrammarCompiler


@pytest.fixture(scope="module")
def compiler(tiny_llm):
    return GrammarCompiler(tiny_llm.tokenizer, tiny_llm.config.vocab_size, tiny_llm.eos_token_ids)


def allowed(processor, output_ids, vocab):
    logits = processor(output_ids, torch.zeros(vocab))
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_mask_follows_the_schema_to_the_end(compiler, tiny_llm):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    proc = compiler.compile(schema, "schema").processor()
    vocab, tok = tiny_llm.config.vocab_size, tiny_llm.tokenizer
    first = allowed(proc, [], vocab)
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    eos = set(tiny_llm.eos_token_ids)
    assert not first & eos
    # Walk greedily through the lowest-id allowed token until only EOS is left.
    out: list[int] = []
    for _ in range(40):
        ok = allowed(proc, out, vocab)
        if ok <= eos:
            break
        out.append(min(ok - eos))
    text = tok.decode(out)
    jsonschema.validate(json.loads(text), schema)
    assert allowed(proc, out, vocab) <= eos


def test_each_sequence_gets_its_own_matcher(compiler, tiny_llm):
    template = compiler.compile({"type": "integer"}, "schema")
    a, b = template.processor(), template.processor()
    vocab = tiny_llm.config.vocab_size
    digit = tiny_llm.encode("7")[0]
    assert digit in allowed(a, [], vocab)
    allowed(a, [digit], vocab)  # a advances ...
    assert allowed(b, [], vocab) == allowed(template.processor(), [], vocab)  # ... b does not


@pytest.mark.parametrize(
    "schema", [{"type": "strin"}, {"not": {"type": "string"}}, {"$ref": "http://example.com/s"}]
)
def test_unusable_schemas_are_refused(compiler, schema):
    with pytest.raises(LlamalabError, match="response_format"):
        compiler.compile(schema, "response_format.json_schema.schema")
