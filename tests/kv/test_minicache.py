"""MiniCache (arXiv 2405.14366): SLERP of directions with both magnitudes kept, exact restoration of the
retained tokens, real memory, and the cache against a slow reference that recomputes every merge from the
original states (tests/kv/references.py) through chunked prefill, rows at different lengths and decoding."""

from __future__ import annotations

import math

import pytest
import torch

import llamalab
from llamalab.errors import LlamalabError
from llamalab.kv.minicache import MiniCache, slerp
from llamalab.kv.registry import CacheSpec
from tests.kv.generation import run_rows
from tests.kv.test_seam import TEXT


def test_slerp_interpolates_the_angle_and_keeps_both_magnitudes():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(50, 16, generator=g) * 3, torch.randn(50, 16, generator=g)
    e, na, nb, d = slerp(xa, xb, 0.6)
    assert torch.allclose(e.norm(dim=-1), torch.ones(50), atol=1e-6)
    assert torch.allclose(na, xa.norm(dim=-1)) and torch.allclose(nb, xb.norm(dim=-1))
    ua, ub = xa / na[:, None], xb / nb[:, None]
    omega = torch.arccos((ua * ub).sum(-1))
    assert torch.allclose(d, omega / math.pi, atol=1e-6)
    # e lies on the great circle from ua to ub, at 0.6 of the angle from ua
    assert torch.allclose(torch.arccos((e * ua).sum(-1).clamp(-1, 1)), 0.6 * omega, atol=1e-4)
    assert torch.allclose(torch.arccos((e * ub).sum(-1).clamp(-1, 1)), 0.4 * omega, atol=1e-4)
    assert torch.allclose(slerp(xa, xb, 0.0)[0], ua, atol=1e-6)
    assert torch.allclose(slerp(xa, xb, 1.0)[0], ub, atol=1e-6)
    same = slerp(xa, 2 * xa, 0.6)  # parallel: the fallback, no 0/0
    assert torch.isfinite(same[0]).all() and torch.allclose(same[0], ua, atol=1e-6)
    assert torch.allclose(same[3], torch.zeros(50), atol=1e-3)


@pytest.fixture(scope="module")
def llm(tiny4_dir):
    return llamalab.load(str(tiny4_dir))


class Recording(MiniCache):
    """MiniCache that also keeps every original state (after RoPE) it was handed, for the checks below."""

    def attend(self, layer, q, k, v, ctx, attention):
        self.seen = getattr(self, "seen", {})
        k_rot = ctx.rotate(k)
        old = self.seen.get(layer)
        self.seen[layer] = (
            (k_rot, v) if old is None else (torch.cat([old[0], k_rot], 2), torch.cat([old[1], v], 2))
        )
        return super().attend(layer, q, k, v, ctx, attention)


def test_retained_tokens_come_back_exactly_and_merged_ones_keep_their_magnitudes(llm):
    config = llm.model.config
    cache = CacheSpec("minicache", args={"start": "1", "gamma": "0.5"}).make(
        config, 64, 1, torch.float32, "cpu"
    )
    _feed_recording(llm, cache)
    assert cache.pairs == [(1, 2)] and set(cache.stores) == {0, 3}  # layer 3 is left over, unmerged
    assert 0.05 < cache.retained_fraction() < 0.95  # both paths are exercised
    for kind in (0, 1):
        kept = cache.kept[0][kind]
        index = torch.cat(kept.index[0]).long()
        head, pos = index % 2, index // 2
        for layer in (1, 2):
            original = cache.seen[layer][kind][0]  # (H, 40, D)
            restored = cache.past(layer, [0])[kind][0]
            assert torch.equal(restored[head, pos], original[head, pos])  # retained: exactly the original
            merged = torch.ones(2, 40, dtype=torch.bool)
            merged[head, pos] = False
            norms = restored.norm(dim=-1)[merged]
            assert torch.allclose(norms, original.norm(dim=-1)[merged], rtol=2e-3)  # fp16 magnitudes
            e = slerp(cache.seen[1][kind][0], cache.seen[2][kind][0], 0.6)[0]
            assert torch.allclose(
                (restored / restored.norm(dim=-1, keepdim=True))[merged], e[merged], atol=1e-5
            )
    # unmerged layers read exactly what they were given
    assert torch.equal(cache.past(0, [0])[0], cache.seen[0][0])


def _generate(llm, spec, prompts):
    return run_rows(llm, spec, prompts, n=20)[0]


def test_generation_matches_the_reference_in_a_batch_of_rows_at_different_lengths(llm):
    ids = llm.encode(TEXT)
    prompts = [ids[:37], ids[:11]]
    args = {"start": "1", "gamma": "0.5"}
    got = _generate(llm, CacheSpec("minicache", args=args), prompts)
    assert got == _generate(llm, CacheSpec("test-reference-minicache", args=args), prompts)
    assert got == [_generate(llm, CacheSpec("minicache", args=args), [p])[0] for p in prompts]
    assert got != _generate(llm, CacheSpec("dense"), prompts)  # merged states are read


def test_memory_is_the_stored_layers_plus_magnitudes_and_kept_tokens(llm):
    config = llm.model.config
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    dense = CacheSpec("dense").make(config, 64, 2, torch.float32, "cpu").nbytes()
    cache = CacheSpec("minicache", args={"start": "2", "retention": "0"}).make(
        config, 64, 2, torch.float32, "cpu"
    )
    layer = dense // L
    magnitudes = 2 * H * 64 * 4 * 2  # rows x heads x positions x (2 layers x K/V) x fp16
    assert cache.nbytes() == 3 * layer + magnitudes  # layers 0, 1 and one merged pair (2, 3)
    quantized = CacheSpec("minicache", 4, 8, {"start": "2", "residual": "16"}).make(
        config, 64, 2, torch.float32, "cpu"
    )
    kivi = CacheSpec("kivi", 4, 8, {"residual": "16"}).make(config, 64, 2, torch.float32, "cpu")
    assert quantized.nbytes() == 3 * kivi.nbytes() // L + magnitudes
    # kept originals count: retaining everything stores both layers' states beside the merged direction
    ids = torch.tensor([llm.encode(TEXT)[:16]] * 2)
    full = CacheSpec("minicache", args={"start": "2", "gamma": "0"}).make(config, 64, 2, torch.float32, "cpu")
    with torch.no_grad():
        llm.model(ids, 0, full, [0, 1])
    kept = 2 * (2 * H * 16) * (2 * D * 4 + 4)  # K and V x (rows x heads x tokens) x (2 states + an index)
    assert full.retained_fraction() > 0.9 and full.nbytes() <= cache.nbytes() + kept


@pytest.mark.parametrize(
    "args, bits, message",
    [
        ({"t": "1.5"}, None, "t=1.5 must be in"),
        ({"gamma": "0.1", "retention": "0.01"}, None, "give one of"),
        ({"start": "3"}, None, "start=3 must be 0..2"),
        ({"residual": "16"}, None, "need --kv-bits"),
        ({}, 3, "--kv-bits 3 is not supported by --kv minicache"),
        ({"window": "2"}, None, "--kv-arg window do.* not apply to --kv minicache"),
    ],
)
def test_bad_settings_fail_with_one_line(llm, args, bits, message):
    with pytest.raises(LlamalabError, match=message):
        CacheSpec("minicache", bits, args=args).make(llm.model.config, 64, 1, torch.float32, "cpu")


def test_retention_ratio_keeps_the_most_dissimilar_pairs():
    from llamalab.kv.minicache import Retention

    ret = Retention(1, None, 0.05)
    g = torch.Generator().manual_seed(0)
    kept, seen = [], []
    for _ in range(4):  # a running selection over passes, as during decoding
        d = torch.rand(3, 250, generator=g)
        mask = ret.select(0, d)
        kept.append(d[mask]), seen.append(d)
        assert float(d[mask].min()) > float(d[~mask].max())  # the largest distances, nothing else
    share = sum(len(k) for k in kept) / sum(s.numel() for s in seen)
    assert 0.03 < share <= 0.05 + 1e-3  # the ratio, up to one histogram bin


def _feed_recording(llm, cache) -> None:
    """Make `cache` record what it is given and feed it 40 tokens of text in chunks of 8."""
    cache.__class__ = Recording
    ids = torch.tensor([llm.encode(TEXT)[:40]])
    with torch.no_grad():
        for s in range(0, 40, 8):
            llm.model(ids[:, s : s + 8], s, cache, [0])


def test_composed_with_kivi_the_merged_states_are_quantized_and_retained_ones_exact(llm):
    config = llm.model.config
    cache = CacheSpec("minicache", 4, 8, {"start": "1", "gamma": "0.5", "residual": "16"}).make(
        config, 64, 1, torch.float32, "cpu"
    )
    _feed_recording(llm, cache)
    assert 0.05 < cache.retained_fraction() < 0.95
    for kind in (0, 1):
        index = torch.cat(cache.kept[0][kind].index[0]).long()
        head, pos = index % 2, index // 2
        e, na, nb, _ = slerp(cache.seen[1][kind][0], cache.seen[2][kind][0], 0.6)
        for layer, norm in ((1, na), (2, nb)):
            original = cache.seen[layer][kind][0]
            got = cache.past(layer, [0])[kind][0]
            assert torch.equal(got[head, pos], original[head, pos])  # retained originals are not quantized
            merged = norm.half().float()[..., None] * e  # what the unquantized cache would restore
            merged[head, pos] = original[head, pos]
            rel = float((got - merged).norm() / merged.norm())
            assert 0 < rel < 0.15  # 4-bit KIVI of the merged directions (the residual window is exact)
