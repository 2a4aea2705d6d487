"""The default model through the lab: a cell's perplexity is exactly the direct call's, and the speed and
memory evaluations report what `llamalab bench` and the KV cache measure (marked slow: the real model)."""

from __future__ import annotations

import pytest

from llamalab.lab.grid import load_grid
from llamalab.lab.results import load_rows
from llamalab.lab.runner import run_grid
from llamalab.lab.store import Store

from .conftest import write_grid

GRID = """
name: real
options: {{model: smollm2-135m, dtype: fp32, threads: 2}}
evals:
  ppl: {{data: alice_heldout, seq_len: 256, max_windows: 2}}
  speed: {{prompt_tokens: 32, new_tokens: 8, repeats: 1}}
  memory: {{context: 1024}}
"""


@pytest.mark.slow
def test_default_model_cell_equals_the_direct_calls(tmp_path, smollm):
    import torch

    from llamalab.eval.perplexity import perplexity
    from llamalab.quant.calib import alice_split

    grid = load_grid(write_grid(tmp_path, GRID, "unused"))
    assert run_grid(grid, workers=0, progress=False).done == 1
    (row,) = load_rows(Store(grid.default_db_url()), grid)
    torch.set_num_threads(2)
    ids = smollm.encode(alice_split()[1], add_special_tokens=False)
    assert row.get("ppl.ppl") == perplexity(smollm, ids, 256, max_windows=2, progress=False).ppl
    assert row.get("model.weight_bytes") == smollm.model.weight_bytes() == row.get("memory.weight_bytes")
    cfg = smollm.model.config
    # a dense fp32 cache: K and V, every layer, KV heads x head dim, 1024 positions, 4 bytes each
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert (
        row.get("memory.kv_cache_bytes")
        == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 1024 * 4
    )
    assert row.get("speed.decode_tokens_per_s") > 0 and row.get("speed.prefill_tokens_per_s") > 0
    assert row.get("speed.threads") == 2 and row.threads == 2
