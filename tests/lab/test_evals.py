"""Every evaluation a grid can name runs through the lab on the tiny model and reports the direct call's
numbers (passkey, needle, memory deterministic; speed as measured)."""

from __future__ import annotations

from llamalab.lab.grid import load_grid
from llamalab.lab.results import load_rows
from llamalab.lab.runner import run_grid
from llamalab.lab.store import Store

from .conftest import write_grid

ALL_EVALS = """
name: evals
options: {{model: {model}, threads: 1}}
evals:
  ppl: {{data: alice, seq_len: 128, stride: 64, max_windows: 2}}
  choice: {{task: alice_cloze, limit: 3}}
  passkey: {{lengths: [160, 256], trials: 2, max_new_tokens: 4}}
  needle: {{lengths: "256", depths: "0,100", max_new_tokens: 4}}
  speed: {{prompt_tokens: 16, new_tokens: 4, repeats: 1}}
  memory: {{context: 256, batch: 2}}
"""


def test_every_evaluation_through_the_lab(tmp_path, tiny_model_dir):
    import torch

    import llamalab
    from llamalab.eval import needle as nd
    from llamalab.eval.passkey import evaluate_passkey

    grid = load_grid(write_grid(tmp_path, ALL_EVALS, tiny_model_dir))
    assert run_grid(grid, workers=0, progress=False).done == 1
    (row,) = load_rows(Store(grid.default_db_url()), grid)
    torch.set_num_threads(1)
    llm = llamalab.load(str(tiny_model_dir))
    direct = evaluate_passkey(llm, [160, 256], 2, 42, 4, progress=False).metrics()
    assert row.get("passkey.accuracy.160") == direct["accuracy"]["160"]
    assert row.get("passkey.mean_accuracy") == direct["mean_accuracy"]
    text, _ = nd.read_haystack(None)
    n = nd.evaluate_needle(llm, text, [256], [0.0, 100.0], max_new_tokens=4, progress=False).metrics()
    assert (
        row.get("needle.accuracy") == n["accuracy"]
        and row.get("needle.grid_hit.100.256") == n["grid_hit"]["100"]["256"]
    )
    cfg = llm.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert (
        row.get("memory.kv_cache_bytes")
        == 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 256 * 4
    )
    assert row.get("ppl.windows") == 2 and row.get("choice.docs") == 3
    assert row.get("speed.decode_tokens_per_s") > 0 and row.get("speed.new_tokens") == 4


KV_BYTES = """
name: kv_bytes
options: {{model: {model}, threads: 1}}
include:
  - {{label: dense, kv: dense}}
  - {{label: kivi-2, kv: kivi, kv_bits: 2, kv_group_size: 16, kv_args.residual: 16}}
evals:
  kv_bytes: {{tokens: 256, chunk_size: 64}}
"""


def test_kv_bytes_counts_a_filled_cache_from_its_tensors(tmp_path, tiny_model_dir):
    grid = load_grid(write_grid(tmp_path, KV_BYTES, tiny_model_dir))
    assert run_grid(grid, workers=0, progress=False).done == 2
    rows = {r.label: r for r in load_rows(Store(grid.default_db_url()), grid)}
    dense, kivi = rows["dense"], rows["kivi-2"]
    # fp32 keys and values: 32 bits a value, 256 tokens x 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes
    assert dense.get("kv_bytes.bits_per_value") == 32
    assert dense.get("kv_bytes.kv_cache_bytes") == 256 * 2 * 2 * 2 * 16 * 4
    assert dense.get("kv_bytes.total_bytes") == dense.get("kv_bytes.weight_bytes") + 256 * 2 * 2 * 2 * 16 * 4
    # KIVI-2 holds 2-bit codes, a scale and a zero per group of 16, and up to 16 + 16 recent tokens in full
    # precision: more than its codes alone, far less than dense
    assert 2 < kivi.get("kv_bytes.bits_per_value") < 0.3 * 32
