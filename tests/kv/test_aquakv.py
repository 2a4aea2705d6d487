"""AQUA-KV (arXiv 2501.19392): the predictors are a direct least-squares solve fitted on *reconstructed*
inputs layer after layer; keys kept before RoPE come back exactly; the cache against a slow reference that
rebuilds every quantized chunk from the original states (tests/kv/references.py) through chunked prefill,
buffer flushes, rows at different lengths and decoding; real memory; bad predictors and settings."""

from __future__ import annotations

import pytest
import torch

import llamalab
from llamalab.errors import LlamalabError
from llamalab.kv.parts.aquakv_calibrate import calibrate
from llamalab.kv.parts.higgs import Higgs
from llamalab.kv.parts.predictors import Predictors, fit_ridge
from llamalab.kv.registry import CacheSpec
from llamalab.model.attention import AttnContext
from llamalab.model.rope import rope_cos_sin
from tests.kv.generation import run_rows
from tests.kv.test_seam import TEXT


def test_ridge_fit_equals_a_direct_least_squares_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g) * torch.linspace(0.1, 5, 12)
    y = (
        x @ torch.randn(12, 7, generator=g)
        + torch.randn(7, generator=g)
        + 0.1 * torch.randn(500, 7, generator=g)
    )
    lam = 1e-3
    w, b = fit_ridge(x, y, lam)
    # the same objective written out: ||[X 1] W - Y||^2 + mu ||W||^2 with mu = lam * mean diag([X 1]^T [X 1])
    xa = torch.cat([x, torch.ones(500, 1)], 1).double()
    mu = lam * float((xa * xa).sum(0).mean())
    aug_x = torch.cat([xa, mu**0.5 * torch.eye(13, dtype=torch.float64)])
    aug_y = torch.cat([y.double(), torch.zeros(13, 7, dtype=torch.float64)])
    direct = torch.linalg.lstsq(aug_x, aug_y).solution  # (13, 7)
    assert torch.allclose(w, direct[:-1].T.float(), atol=1e-5)
    assert torch.allclose(b, direct[-1].float(), atol=1e-5)


@pytest.fixture(scope="module")
def llm(tiny4_dir):
    return llamalab.load(str(tiny4_dir))


@pytest.fixture(scope="module")
def windows(llm):
    ids = llm.encode(TEXT * 6)
    return torch.tensor([ids[i * 40 : i * 40 + 64] for i in range(8)])  # (8, 64)


@pytest.fixture(scope="module")
def predictors_file(llm, windows, tmp_path_factory):
    path = tmp_path_factory.mktemp("aquakv") / "tiny4.safetensors"
    calibrate(llm, windows, bits=2.0, progress=False).save(path)
    return path


def _true_kv(llm, ids):
    """Every layer's keys (before RoPE) and values (n, L, C) of the unquantized model on `ids`."""
    from llamalab.kv.parts.aquakv_calibrate import _Catch, _flat

    model = llm.model
    catch, out = _Catch(), []
    x = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(ids.shape[1])[None], model.attention_factor, x.dtype)
    with torch.no_grad():
        for block in model.model.layers:
            n = ids.shape[0]
            x = block(
                x, AttnContext(cos.expand(n, -1, -1), sin.expand(n, -1, -1), catch, list(range(n)), [0] * n)
            )
            out.append((_flat(catch.k), _flat(catch.v)))
    return out


def test_predictors_are_fitted_on_reconstructed_inputs_layer_after_layer(llm, windows, predictors_file):
    fitted = Predictors.load(predictors_file)
    kv = _true_kv(llm, windows)
    C = kv[0][0].shape[-1]
    q, first = Higgs(C, C, 2, 16), Higgs(C, C, 2, 256)
    train = torch.randperm(8, generator=torch.Generator().manual_seed(0))[1:]  # 1 of 8 windows held out
    flat = lambda t: t[train].reshape(-1, t.shape[-1])  # noqa: E731
    rec_k = first.quantize_dequantize(kv[0][0].reshape(-1, C)).reshape(kv[0][0].shape)
    rec_v = first.quantize_dequantize(kv[0][1].reshape(-1, C)).reshape(kv[0][1].shape)
    for layer in range(1, 4):
        k, v = kv[layer]
        w, b = fit_ridge(flat(rec_k), flat(k))
        assert torch.allclose(fitted.key[layer][0], w, atol=1e-4) and torch.allclose(
            fitted.key[layer][1], b, atol=1e-4
        )
        if layer == 1:  # fitting on the original keys instead would give other predictors
            w_orig, _ = fit_ridge(flat(kv[0][0]), flat(k))
            assert not torch.allclose(w_orig, w, atol=1e-3)
        pk = rec_k @ w.T + b
        rec_k = pk + q.quantize_dequantize((k - pk).reshape(-1, C)).reshape(k.shape)
        w, b = fit_ridge(flat(torch.cat([rec_k, rec_v], -1)), flat(v))
        assert torch.allclose(fitted.value[layer][0], w, atol=1e-4)
        pv = torch.cat([rec_k, rec_v], -1) @ w.T + b
        rec_v = pv + q.quantize_dequantize((v - pv).reshape(-1, C)).reshape(v.shape)
    meta = fitted.meta
    assert meta["bits"] == 2.0 and meta["group_size"] == C and meta["valid_windows"] == 1
    assert meta["model"]["num_hidden_layers"] == 4 and len(meta["layers"]) == 4
    # residual quantization after prediction beats quantizing the values directly at the same bits
    assert meta["layers"][3]["recon_rel_mse_v"] < 0.117  # the 2-bit grid's error on N(0, 1)


@pytest.mark.parametrize("rope", [None, "dynamic"])
def test_keys_kept_before_rope_come_back_exactly(llm, tiny4_dir, rope):
    """With a buffer that never fills, every past key is stored before RoPE and rotated when read: the
    result equals the dense cache, which stores keys rotated once. With a length-dependent RoPE (dynamic NTK
    past L0 = 32) the past keys must be rotated as the model rotates this cache's sequences: for the cache's
    length (80), not the model's context (128)."""
    if rope:
        from llamalab.model_options import ModelOptions, apply_rope_scaling

        llm = llamalab.load(str(tiny4_dir))  # a fresh copy: the module's model stays unscaled
        apply_rope_scaling(llm, ModelOptions(rope_scaling=rope, rope_factor=4, rope_original_max=32))
    ids = llm.encode(TEXT)[:30]
    spec = CacheSpec("higgs", args={"buffer": "1000"})
    got = llm.engine(max_batch=1, max_len=80, kv=spec, prefill_chunk=7, native=False)
    dense = llm.engine(max_batch=1, max_len=80, kv="dense", prefill_chunk=7, native=False)
    outs = []
    for engine in (got, dense):
        seq = None
        for event in engine.run([ids], [llm.sampling(max_new_tokens=12, ignore_eos=True, logprobs=2)]):
            seq = event.seq
        outs.append(seq)
    assert outs[0].output_ids == outs[1].output_ids
    for a, b in zip(outs[0].logprobs, outs[1].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def _generate(llm, spec, prompts):
    return run_rows(llm, spec, prompts, n=14)[0]


@pytest.mark.parametrize("method", ["aquakv", "higgs"])
def test_generation_matches_the_reference_in_a_batch_of_rows_at_different_lengths(
    llm, predictors_file, method
):
    ids = llm.encode(TEXT)
    prompts = [ids[:30], ids[:6]]  # 30: flushes during prefill (at 16 and 30); 6: only during decode (at 16)
    args = {"sinks": "4", "buffer": "12"}
    predictors = str(predictors_file) if method == "aquakv" else None
    got = _generate(llm, CacheSpec(method, args=args, predictors=predictors), prompts)
    want = _generate(llm, CacheSpec("test-reference-aquakv", 2.0, args=args, predictors=predictors), prompts)
    assert got == want
    assert got == [
        _generate(llm, CacheSpec(method, args=args, predictors=predictors), [p])[0] for p in prompts
    ]
    assert got != _generate(llm, CacheSpec("dense"), prompts)  # the quantized past is read


def test_memory_is_codes_scales_and_the_full_precision_slots(llm, predictors_file):
    config = llm.model.config
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    C = H * D
    cache = CacheSpec("aquakv", predictors=str(predictors_file)).make(config, 1024, 2, torch.float32, "cpu")
    cap = 2 * (1024 - 4)
    layer0 = 2 * cap * (C // 2 * 8 // 8 + 2)  # 4-bit grid of pairs: one byte per 2 values, fp16 scale
    others = 2 * cap * (C // 2 * 4 // 8 + 2)  # 2-bit grid: half a byte per 2 values
    fp = 2 * 2 * H * (4 + 128) * D * 4  # sinks and buffer, keys and values, fp32
    assert cache.nbytes() == layer0 + (L - 1) * others + L * fp
    assert cache.quantizer.bits_per_value == pytest.approx(2 + 16 / C)
    assert cache.predictor_bytes() == (L - 1) * 4 * (C * C + C + 2 * C * C + C)


def test_predictors_of_another_model_or_settings_are_refused(llm, predictors_file, tiny_dir, tmp_path):
    other = llamalab.load(str(tiny_dir))  # 2 layers
    with pytest.raises(
        LlamalabError, match="calibrated for another model .*num_hidden_layers=4, this model has 2"
    ):
        CacheSpec("aquakv", predictors=str(predictors_file)).make(
            other.model.config, 64, 1, torch.float32, "cpu"
        )
    config = llm.model.config
    with pytest.raises(
        LlamalabError, match="--kv-bits 3 differs from the 2 the predictors .* were fitted with"
    ):
        CacheSpec("aquakv", 3, predictors=str(predictors_file)).make(config, 64, 1, torch.float32, "cpu")
    with pytest.raises(LlamalabError, match="needs --kv-predictors FILE"):
        CacheSpec("aquakv").make(config, 64, 1, torch.float32, "cpu")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LlamalabError, match="not a predictors file"):
        CacheSpec("aquakv", predictors=str(bad)).make(config, 64, 1, torch.float32, "cpu")
    with pytest.raises(LlamalabError, match="2.3 bits per value is not a grid"):
        CacheSpec("higgs", 2.3).make(config, 64, 1, torch.float32, "cpu")
    with pytest.raises(LlamalabError, match="group size 24 must divide the KV width 32"):
        CacheSpec("higgs", 2, 24).make(config, 64, 1, torch.float32, "cpu")
    with pytest.raises(LlamalabError, match="--kv-predictors do.* not apply to --kv higgs"):
        CacheSpec("higgs", predictors=str(predictors_file)).make(config, 64, 1, torch.float32, "cpu")


def test_kv_calibrate_writes_predictors_the_cache_takes(llm, tiny4_dir, tmp_path):
    from tests.test_cli import assert_clean_error, run

    out = tmp_path / "p.safetensors"
    proc = run(
        "kv", "calibrate", "--model", str(tiny4_dir), "--nsamples", "4", "--seq-len", "48", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "AQUA-KV predictors for 3 layers" in proc.stdout
    fitted = Predictors.load(out)
    assert fitted.meta["calibration"]["nsamples"] == 4 and fitted.meta["window_tokens"] == 48
    CacheSpec("aquakv", predictors=str(out)).make(llm.model.config, 64, 1, torch.float32, "cpu")
    proc = run("kv", "calibrate", "--model", str(tiny4_dir), "--method", "minicache", "--out", str(out))
    assert_clean_error(proc, "--method 'minicache': only aquakv has parameters to calibrate")
