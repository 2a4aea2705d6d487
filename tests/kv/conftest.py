"""The KV tests' shared pieces: the sliding-window test method (registered when imported), a 4-layer tiny
model (so that cross-layer methods have a chain and a pair beside unmerged layers), and factories that put
the reference caches of `references.py` behind `--kv` names for the engine."""

import pytest

import tests.kv.sliding_window  # noqa: F401
from llamalab.kv.registry import register_kv_cache
from tests.kv import references


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory):
    """A tiny random LLaMA with 4 layers (2 KV heads of 16 dimensions: a 32-wide KV vector)."""
    from tests.tiny import write_tiny_dir

    return write_tiny_dir(tmp_path_factory.mktemp("tiny4") / "tiny4", num_hidden_layers=4)


@register_kv_cache("test-reference-kivi")
def _reference_kivi(spec, config, max_len, max_batch, dtype, device):
    return references.ReferenceKivi(
        config.num_hidden_layers, max_batch, int(spec.bits), spec.group_size, int(spec.args["residual"])
    )


@register_kv_cache("test-reference-minicache")
def _reference_minicache(spec, config, max_len, max_batch, dtype, device):
    return references.ReferenceMiniCache(
        config.num_hidden_layers, max_batch, int(spec.args["start"]), float(spec.args.get("t", 0.6)),
        float(spec.args["gamma"]),
    )  # fmt: skip


@register_kv_cache("test-reference-aquakv")
def _reference_aquakv(spec, config, max_len, max_batch, dtype, device):
    from llamalab.kv.parts.higgs import Higgs, grid_for_bits
    from llamalab.kv.parts.predictors import Predictors

    width = config.num_key_value_heads * config.head_dim
    predictors = Predictors.load(spec.predictors) if spec.predictors else None
    quantizer = Higgs(width, width, 2, grid_for_bits(spec.bits or 2.0))
    first = Higgs(width, width, 2, 256)
    return references.ReferenceAqua(
        config.num_hidden_layers, max_batch, predictors, quantizer, first, int(spec.args["sinks"]),
        int(spec.args["buffer"]),
    )  # fmt: skip
