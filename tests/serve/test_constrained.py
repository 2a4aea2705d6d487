"""The grammar mask itself: which tokens it allows, and that following it yields schema-valid JSON."""

from __future__ import annotations

import json
import time

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
    proc = compiler.compile(schema, "schema", 1024).processor()
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
    template = compiler.compile({"type": "integer"}, "schema", 1024)
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
        compiler.compile(schema, "response_format.json_schema.schema", 1024)


def test_the_next_mask_is_computed_on_the_grammar_thread(compiler, tiny_llm):
    template = compiler.compile({"type": "array", "items": {"type": "integer"}}, "schema", 1024)
    vocab = tiny_llm.config.vocab_size
    ahead, inline = template.processor(), template.processor()
    assert ahead.ready()  # the first mask comes with the template
    out = [min(allowed(ahead, [], vocab))]
    allowed(inline, [], vocab)
    ahead.prepare(out)  # what the engine does once a token is accepted
    deadline = time.monotonic() + 30
    while not ahead.ready():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert allowed(ahead, out, vocab) == allowed(inline, out, vocab)


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"$ref": "#"}, "no JSON value"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
        ({"type": "string", "minLength": 10**9}, "minLength"),
        ({"type": "array", "items": {"type": "object", "minProperties": 10**9}}, "items.minProperties"),
        ({"enum": ["x" * 100] * 400}, "bytes"),
    ],
)
def test_schemas_no_answer_can_satisfy_are_refused_before_they_run(compiler, schema, message):
    with pytest.raises(LlamalabError, match=message):
        compiler.compile(schema, "schema", 1024)
    compiler.compile({"type": "string", "minLength": 1000}, "schema", 1024)  # long, but it fits
    # Values and names are not keywords: a default that looks like one, a property named like one.
    compiler.compile({"type": "object", "default": {"minLength": 10**9}}, "schema", 1024)
    compiler.compile({"type": "object", "properties": {"minItems": {"type": "integer"}}}, "schema", 1024)
