"""Every method end to end on a tiny random LLaMA: layer-sequential calibration, in-place swap, and the
loader hook rebuilding the same model from the saved tensors + quantization config (no re-quantization)."""

import pytest
import torch

from llamalab.io.tokenizer import Tokenizer
from llamalab.model.build import build_model
from llamalab.quant import CalibConfig, QuantLinear, prepare_model, quantize_model
from llamalab.quant.checkpoint import quantization_config
from tests.tiny import hf_model, ours_from_hf, tiny_bpe

# (method, bits, group, options, the largest relative output error accepted). Each bound is the error the
# method measures on this test's model and input (torch 2.13, 1 thread; the same with ATEN_CPU_CAPABILITY=avx2
# and ONEDNN_MAX_CPU_ISA=AVX2, except PB-LLM's 0.494) times 1.25: room for other CPUs' rounding to move a
# few discrete choices (salient columns, splits), none for a method that quantizes worse than it does.
CASES = [
    ("rtn", 4, 32, {}, 0.026),  # measured 0.0209
    ("rtn", 8, -1, {}, 1.4e-4),  # 1.13e-4
    ("gptq", 4, 32, {"act_order": True}, 0.038),  # 0.0304
    ("gptq", 3, 32, {"act_order": True, "static_groups": True, "true_sequential": True}, 0.17),  # 0.134
    ("awq", 4, 32, {}, 0.030),  # 0.0242
    ("nf4", 4, 64, {}, 0.031),  # 0.0246
    ("smoothquant", 8, -1, {"act_bits": 8}, 3.7e-4),  # 2.95e-4
    ("smoothquant", 4, -1, {"act_bits": 4}, 0.092),  # 0.0739
    ("quip", 2, -1, {}, 0.79),  # 0.632
    ("pbllm", 1.7, 64, {}, 0.63),  # 0.508
    ("billm", 1.1, 64, {}, 0.77),  # 0.619
    ("slimllm", 2, 32, {}, 0.69),  # 0.551
    ("dbllm", 2, 32, {}, 0.29),  # 0.229
]


@pytest.fixture(scope="module")
def tiny_tok():
    return Tokenizer(tiny_bpe())


@pytest.mark.parametrize("method,bits,group,opts,bound", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_method_quantizes_and_reloads_through_the_loader_hook(method, bits, group, opts, bound, tiny_tok):
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
    assert 0 < rel <= bound, f"relative output error {rel:.4g}, at most {bound} for {method}"
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


def test_quips_transforms_follow_the_calibration_seed_unless_named(tiny_tok):
    """One seed draws the calibration windows and QuIP's random orthogonal transforms (the CLI's --seed, a lab
    cell's quant.seed); an explicit `seed` option still wins."""
    hf = hf_model(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)

    def quip(calib_seed, **opts):
        llm = type("L", (), {})()
        llm.model, llm.tokenizer = ours_from_hf(hf), tiny_tok
        r = quantize_model(llm, "quip", 2, -1, CalibConfig("alice", 2, 32, calib_seed), [0], False, **opts)
        return r.settings["seed"]

    assert quip(0) == 0 and quip(3) == 3 and quip(3, seed=5) == 5
