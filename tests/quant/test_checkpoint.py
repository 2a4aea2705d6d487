"""Quantized directories: save, load with every command, real bytes, bad input; GGUF export round trip."""

import copy
import json
import os

import pytest
import torch

import llamalab
from llamalab import kernels
from llamalab.cli import main
from llamalab.quant import CalibConfig, QuantLinear, quantize_model, save_quantized
from llamalab.quant.base import UniformQuantLinear

PROMPT = "Alice was beginning to get very tired of sitting by her sister"


def fresh(smollm):
    """A private copy of the session model (quantization works in place)."""
    llm = copy.copy(smollm)
    llm.model = copy.deepcopy(smollm.model)
    return llm


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, smollm):
    llm = fresh(smollm)
    report = quantize_model(llm, "gptq", 4, 64, CalibConfig("alice", 4, 128, 0), layers=[0], progress=False,
                            act_order=True)  # fmt: skip
    ids = llm.encode(PROMPT)
    logits = llm.logits(ids)
    out = tmp_path_factory.mktemp("q") / "gptq"
    # fp32: the unquantized tensors exactly as calibrated, so the reloaded logits match closely
    save_quantized(llm, report, out, "fp32")
    return out, logits, ids, report


@pytest.mark.slow
def test_saved_directory_loads_without_requantizing_and_matches(gptq_dir, kernels_expected):
    out, logits, ids, report = gptq_dir
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llamalab" and cfg["method"] == "gptq" and cfg["bits"] == 4
    assert cfg["group_size"] == 64 and cfg["act_order"] is True and cfg["percdamp"] == 0.01
    assert cfg["calibration"] == {"source": "alice", "nsamples": 4, "seq_len": 128, "seed": 0, "tokens": 512}
    assert {"llamalab", "torch", "python"} <= set(cfg["versions"])
    assert len(cfg["modules"]) == 7 and cfg["modules"]["model.layers.0.mlp.down_proj"]["perm"] is True
    llm = llamalab.load(str(out))
    q = llm.model.model.layers[0].self_attn.q_proj
    native = kernels_expected  # the native int4 kernels, else (fp32) dequantize on the fly
    assert isinstance(q, UniformQuantLinear) and q.kernel == ("native" if native else None)
    assert "qkv_proj" in llm.model.model.layers[2].self_attn._modules  # unquantized blocks stay fused
    assert torch.allclose(llm.logits(ids), logits, atol=2e-3)
    bf = llamalab.load(str(out), dtype="bf16")
    assert bf.model.model.layers[0].self_attn.q_proj.kernel == ("native" if native else "int4")
    assert (bf.logits(ids).argmax(-1) == logits.argmax(-1)).float().mean() > 0.9
    assert report.bits_per_weight < 4.7


def test_unquantized_tensors_stored_in_bf16_and_modes_follow_the_umask(tmp_path):
    from safetensors import safe_open

    from llamalab.io.hf import write_hf_dir
    from llamalab.io.tokenizer import Tokenizer
    from llamalab.model.config import ModelConfig
    from llamalab.model.transformer import Transformer
    from tests.tiny import BASE, tiny_bpe

    config = ModelConfig(**{**BASE, "tie_word_embeddings": True})
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.5 for k, v in Transformer(config).state_dict().items()}
    write_hf_dir(tmp_path / "base", config.to_hf(), state, tokenizer=Tokenizer(tiny_bpe()))
    llm = llamalab.load(str(tmp_path / "base"))
    report = quantize_model(llm, "rtn", 4, 32, progress=False)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = llm.model(ids)
    umask = os.umask(0o027)
    try:
        save_quantized(llm, report, tmp_path / "bf16")  # the default
        os.umask(0o002)
        save_quantized(llm, report, tmp_path / "fp32", "fp32")
    finally:
        os.umask(umask)
    for name, mode in (("bf16", 0o750), ("fp32", 0o775)):  # 0777 / 0666 minus the umask of the save
        d = tmp_path / name
        assert d.stat().st_mode & 0o777 == mode
        assert {f.name: f.stat().st_mode & 0o777 for f in d.iterdir()} == {
            f.name: mode & 0o666 for f in d.iterdir()
        }
    # what is not quantized (embedding = the tied head, norms) is bf16 on disk; the packed buffers are as before
    dense = {
        k: v for k, v in llm.model.state_dict().items() if k.endswith(("embed_tokens.weight", "norm.weight"))
    }
    assert len(dense) == 2 + 2 * config.num_hidden_layers
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "lm_head.weight" not in stored and all(stored[k] == "BF16" for k in dense)
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert all(stored[k] == f.get_slice(k).get_dtype() for k in f.keys() if k not in dense)
    n_dense = sum(t.numel() for t in dense.values())
    saved = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    saved -= (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert abs(saved - 2 * n_dense) < 256, (saved, 2 * n_dense)  # 2 bytes saved per weight (headers aside)
    # loaded in fp32, the dense tensors are upcast; the logits are the in-memory model's with exactly those
    # tensors rounded to bf16
    loaded = llamalab.load(str(tmp_path / "bf16"))
    for k, t in dense.items():
        got = loaded.model.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, t.bfloat16().float()), k
    with torch.no_grad():
        for t in dense.values():
            t.copy_(t.bfloat16().float())
        rounded = llm.model(ids)
        again = loaded.model(ids)
    assert not torch.equal(rounded, logits)  # rounding the dense tensors does change the logits ...
    assert torch.allclose(again, rounded, atol=1e-4 * float(rounded.abs().max()))  # ... and only that does


@pytest.mark.slow
def test_cli_quantize_then_info_and_generate_load_it(tmp_path, capsys, smollm):
    out = tmp_path / "rtn8"
    assert main(["quantize", "--method", "rtn", "--bits", "8", "--out", str(out)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert main(["info", "-m", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    base = smollm
    assert info["parameters"] == base.model.num_parameters()  # packed linears still count their weights
    # real bytes: 7 x 30 linears went from 4 bytes to ~1 byte per weight
    n_linear = sum(m.weight.numel() for n, m in base.model.named_modules() if n.endswith("_proj"))
    assert base.model.weight_bytes() - info["bytes_in_memory"] > 2.9 * n_linear
    assert main(["generate", "-m", str(out), "-p", "The capital of France is", "--max-new-tokens", "4"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,msg",
    [
        (["--method", "gptq", "--bits", "9"], "--bits 9 is out of range"),
        (["--method", "rtn", "--bits", "4", "--group-size", "128"], "does not divide the input width 576"),
        (["--method", "rtn", "--group-size", "0"], "--group-size must be"),
        (["--method", "nope"], "unknown quantization method 'nope'"),
        (["--method", "rtn", "--save-dtype", "int8"], "unknown dtype 'int8'"),
        (["--method", "gptq", "--calib", "SHORT", "--seq-len", "512"], "too little for one window"),
        (["--method", "gptq", "--calib", "c4"], "cannot be reached"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, msg):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    args = [str(short) if a == "SHORT" else a for a in args]
    out = tmp_path / "never"
    assert main(["quantize", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_memory_4bit_linears_at_most_0_3x_fp16(tmp_path, smollm, kernels_expected):
    """4-bit g64 (the g128 study setting, which 576 cannot take) loaded in bf16: codes + scale/offset."""
    llm = fresh(smollm)
    report = quantize_model(llm, "rtn", 4, 64, progress=False)
    save_quantized(llm, report, tmp_path / "w4")
    loaded = llamalab.load(str(tmp_path / "w4"), dtype="bf16")
    mods = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert all(m.kernel == ("native" if kernels_expected else "int4") for m in mods)
    qbytes = sum(m.nbytes for m in mods)
    fp16 = sum(2 * m.in_features * m.out_features for m in mods)
    assert qbytes <= 0.3 * fp16, qbytes / fp16


@pytest.mark.parametrize("native", [True, False])
def test_memory_4bit_g128_at_most_0_3x_fp16_on_a_128_divisible_model(native, monkeypatch, request):
    from tests.tiny import hf_model, ours_from_hf

    if native:
        request.getfixturevalue("native_kernels")  # skips where unsupported, fails where broken
    llm = type("L", (), {})()
    hf = hf_model(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2)
    llm.model = ours_from_hf(hf)
    quantize_model(llm, "rtn", 4, 128, progress=False)
    mods = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    fp16 = sum(2 * m.in_features * m.out_features for m in mods)
    # the portable layout: 4-bit codes + fp32 scale + 4-bit zero per 128 = 4.28 bits
    assert all(m.kernel is None for m in mods) and sum(m.nbytes for m in mods) <= 0.3 * fp16
    llm.model.to(torch.bfloat16)
    if not native:
        monkeypatch.setenv("LLAMALAB_KERNELS", "0")
        kernels.reset()
    try:
        for m in mods:
            m.prepare()
    finally:
        monkeypatch.undo()
        kernels.reset()
    # native: the portable layout read as it is (bf16 scales: 4.16 bits); otherwise PyTorch's int4 layout
    # with bf16 scale/offset (4.25 bits)
    assert all(m.kernel == ("native" if native else "int4") for m in mods)
    assert sum(m.nbytes for m in mods) <= 0.3 * fp16


@pytest.mark.slow
def test_gguf_export_reads_back_with_matching_weights(tmp_path, smollm):
    import gguf

    from llamalab.io.gguf import GGUFFile, permute_qk, unpermute_qk
    from llamalab.io.gguf_export import export_gguf

    # Our reader sees what the writer meant: the Q8_0 blocks of gguf's quantizer, Q/K rows un-permuted. That
    # llama.cpp runs every exported type as we do is tests/quant/test_gguf_export_llama_cpp.py.
    llm = smollm
    path = tmp_path / "m-q8_0.gguf"
    assert main(["export", "--format", "gguf", "--type", "q8_0", "--out", str(path)]) == 0
    f = GGUFFile(path)
    assert f.metadata["tokenizer.ggml.pre"] == "smollm" and f.metadata["llama.block_count"] == 30
    state = f.state_dict(9, 3)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"):  # fmt: skip
        w = llm.model.state_dict()[name]
        heads = 9 if "q_proj" in name else 3
        wp = permute_qk(w, heads) if "_proj" in name and ("q_" in name or "k_" in name) else w
        deq = gguf.quants.dequantize(
            gguf.quants.quantize(wp.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        )
        want = torch.from_numpy(deq.reshape(wp.shape).copy())
        want = unpermute_qk(want, heads) if wp is not w else want
        assert torch.equal(state[name], want), name
    with pytest.raises(llamalab.errors.LlamalabError, match="file exists"):
        export_gguf(llm, path, "q8_0")
