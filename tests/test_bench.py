"""`llamalab.bench.bench_model`'s memory figures: the cache's bytes as measured from its tensors, and the peak
resident memory the timed rounds added (tests/test_cli.py runs `llamalab bench` itself)."""

import llamalab
from llamalab.bench import bench_model
from llamalab.kv.registry import CacheSpec


def test_bench_reports_the_caches_measured_bytes_and_the_rounds_own_peak(tiny_dir):
    spec = CacheSpec("kivi", 2, group_size=8, args={"residual": "16"})
    llm = llamalab.load(str(tiny_dir), kv=spec)
    r = bench_model(llm, prompt_tokens=40, new_tokens=4, repeats=1)
    cache = spec.make(llm.model.config, 45, 1, llm.dtype, "cpu")  # the engine's: prompt + new + 1 positions
    assert r["kv"] == "kivi" and r["kv_cache_mb"] == round(cache.nbytes() / 1e6, 2)
    # Linux resets the high-water mark before the rounds; what they added is small and not negative
    assert r["run_peak_mb"] is None or 0 <= r["run_peak_mb"] < r["peak_rss_mb"]
