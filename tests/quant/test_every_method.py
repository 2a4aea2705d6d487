"""Every method end to end on a tiny random LLaMA: layer-sequential calibration, in-place swap, and the
loader hook rebuilding the same model from the saved tensors + quantization config (no re-quantization)."""

import pytest
import torch

from llamalab.io.tokenizer import Tokenizer
from llamalab.model.build import build_model
from llamalab.quant import CalibConfig, QuantLinear, prepare_model, quantize_model
from llamalab.quant.checkpoint import quantization_config
from tests.tiny import hf_model, ours_from_hf, tiny_bpe

CASES = [
    ("rtn", 4, 32, {}),
    ("rtn", 8, -1, {}),
    ("gptq", 4, 32, {"act_order": True}),
    ("gptq", 3, 32, {"act_order": True, "static_groups": True, "true_sequential": True}),
    ("awq", 4, 32, {}),
    ("nf4", 4, 64, {}),
    ("smoothquant", 8, -1, {"act_bits": 8}),
    ("smoothquant", 4, -1, {"act_bits": 4}),
    ("quip", 2, -1, {}),
    ("pbllm", 1.7, 64, {}),
    ("billm", 1.1, 64, {}),
    ("slimllm", 2, 32, {}),
    ("dbllm", 2, 32, {}),
]


@pytest.fixture(scope="module")
def tiny_tok():
    return Tokenizer(tiny_bpe())


@pytest.mark.parametrize("method,bits,group,opts", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_method_quantizes_and_reloads_through_the_loader_hook(method, bits, group, opts, tiny_tok):
    hf = hf_model(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    llm = type("L", (), {})()
    llm.model, llm.tokenizer = ours_from_hf(hf), tiny_tok
    llm.config = llm.model.config
    ids = torch.randint(0, 400, (1, 24))
    with torch.no_grad():
        ref = llm.model(ids)
    report = quantize_model(llm, method, bits, group, CalibConfig("alice", 4, 64, 0), progress=False, **opts)
    mods = {n: m for n, m in llm.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 14 and report.quantized_params == sum(
        m.in_features * m.out_features for m in mods.values()
    )
    with torch.no_grad():
        out = llm.model(ids)
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < rel < (1.0 if bits <= 2 else 0.5 if bits <= 3 else 0.1), (
        rel
    )  # quantized, yet still the same function roughly
    # what save_quantized writes: the state dict (fp16 where the format stores fp16) + the config
    state = {}
    for name, t in llm.model.state_dict().items():
        owner = name.rpartition(".")[0]
        state[name] = (
            t.half().float() if owner in mods and name.rpartition(".")[2] in mods[owner].fp16_buffers else t
        )
    qcfg = quantization_config(llm.model, report)
    reloaded = build_model(llm.config, state, raw_config={"quantization_config": qcfg})
    with torch.no_grad():
        again = reloaded(ids)
    assert torch.allclose(again, out, atol=1e-3 * out.abs().max()), float((again - out).abs().max())
    prepare_model(llm.model)  # kernels (where the format has one) compute the same function
    with torch.no_grad():
        assert torch.allclose(llm.model(ids), out, atol=2e-3 * out.abs().max())
