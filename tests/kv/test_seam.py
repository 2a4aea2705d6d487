"""The KV-cache seam: one registry, and a method that keeps fewer slots than positions (the sliding-window
cache of tests/kv/sliding_window.py) running through generation, the server and chunked perplexity, each
against a slow reference (full attention over the whole sequence with the same position mask)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

import llamalab
from llamalab.cli import main
from llamalab.errors import LlamalabError
from llamalab.eval.perplexity import perplexity
from llamalab.kv.dense import DenseCache
from llamalab.kv.registry import CacheSpec, cache_factory, kv_cache_names, register_kv_cache
from llamalab.model_options import ModelOptions
from llamalab.serve.server import BackgroundServer
from llamalab.serve.state import ServeConfig
from tests.kv.sliding_window import SINKS, WINDOW

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
    "do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
    "conversations in it, and what is the use of a book, thought Alice, without pictures or conversations?"
)


def test_registry_knows_dense_refuses_unknown_and_takes_new_methods():
    assert {"dense", "sliding-window"} <= set(kv_cache_names())
    assert cache_factory("dense") is not None
    with pytest.raises(LlamalabError, match="unknown --kv 'nosuch'; known: .*dense"):
        CacheSpec("nosuch").check()
    with pytest.raises(LlamalabError, match="--kv-bits do.* not apply to --kv dense"):
        CacheSpec("dense", bits=2).make(None, 8, 1, torch.float32, "cpu")
    made = []

    @register_kv_cache("test-recording")
    def factory(spec, config, max_len, max_batch, dtype, device):
        made.append((max_len, max_batch, spec.bits))
        return DenseCache(1, 1, 4, max_len, max_batch, dtype, device)

    cache = CacheSpec("test-recording", bits=2).make(None, 16, 2, torch.float32, "cpu")
    assert isinstance(cache, DenseCache) and made == [(16, 2, 2)]


def reference_greedy(tiny_dir, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step with window attention, no cache."""
    model = llamalab.load(str(tiny_dir)).model
    model.set_attention_backend("test-sliding-window")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def window_llm(tiny_dir):
    return llamalab.load(str(tiny_dir), kv="sliding-window")


def test_a_cache_with_fewer_slots_than_positions_generates_as_its_reference(tiny_dir, window_llm):
    prompt = window_llm.encode(TEXT)[:40]
    expected = reference_greedy(tiny_dir, prompt, 24)
    (seq,) = window_llm.generate_sequences([prompt], max_new_tokens=24, ignore_eos=True)
    assert seq.output_ids == expected
    dense = llamalab.load(str(tiny_dir)).generate_sequences([prompt], max_new_tokens=24, ignore_eos=True)
    assert dense[0].output_ids != expected  # the window changes what the model sees
    # Chunked prefill through the method (8-token chunks) and a batch of two rows at different lengths.
    engine = window_llm.engine(max_batch=2, max_len=96, prefill_chunk=8)
    assert engine.decode_path.startswith("pytorch")  # not the dense layout the native step writes
    params = window_llm.sampling(max_new_tokens=24, ignore_eos=True)
    short = window_llm.encode(TEXT)[:9]
    done = {}
    for event in engine.run([prompt, short], [params, window_llm.sampling(**vars(params))]):
        if event.finished:
            done[len(event.seq.prompt_ids)] = event.seq.output_ids
    assert done[40] == expected
    assert done[9] == reference_greedy(tiny_dir, short, 24)
    # It really holds fewer slots: sinks + window per layer and row, where dense holds every position.
    per_slot = 2 * window_llm.config.num_key_value_heads * window_llm.config.head_dim * 4
    assert engine.cache.nbytes() <= 2 * window_llm.config.num_hidden_layers * (SINKS + WINDOW) * per_slot
    assert len(prompt) + 24 > SINKS + WINDOW


def test_the_server_serves_with_the_method(tiny_dir, window_llm):
    prompt = TEXT[:150]
    expected = window_llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
    config = ServeConfig(ModelOptions(str(tiny_dir), kv="sliding-window"), port=0, max_batch=2)
    with BackgroundServer(config) as url:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected


def test_chunked_perplexity_reads_the_method(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 3)
    out = tmp_path / "ppl.json"
    args = ["eval", "ppl", "--model", str(tiny_dir), "--data", str(data), "--seq-len", "64"]
    code = main([*args, "--chunk-size", "8", "--kv", "sliding-window", "--output-json", str(out)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())["metrics"]["ppl"]
    reference = llamalab.load(str(tiny_dir))
    tokens = reference.encode(TEXT * 3)
    dense = perplexity(reference, tokens, 64, progress=False).ppl
    reference.model.set_attention_backend("test-sliding-window")
    windowed = perplexity(reference, tokens, 64, progress=False).ppl
    assert got == pytest.approx(windowed, rel=1e-5)
    assert abs(got - dense) > 1e-4 * dense  # ten times the tolerance above: the window is what is read


def test_every_method_name_is_found_by_its_module_in_a_fresh_process():
    """A name registered from another method's module would be unknown until that module was imported."""
    code = (
        "from llamalab.kv.registry import cache_factory, kv_cache_names\n"
        "names = kv_cache_names()\n"
        "assert {'dense', 'kivi', 'minicache', 'aquakv', 'higgs'} <= set(names), names\n"
        "for name in names:\n"
        "    assert cache_factory(name) is not None, name\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
