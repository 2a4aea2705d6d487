"""LoRA and QLoRA at the Linear-swap seam: the adapted model equals its merged model; QLoRA computes
dequantized NF4 plus the adapter; targets that match nothing are named."""

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.model.modules import get_module
from llamalab.train.config import LoRAConfig, QLoRAConfig
from llamalab.train.lora import LoRALinear, adapter_state, apply_lora, merge_lora, quantize_base_nf4
from tests.tiny import hf_model, ours_from_hf


def trained_adapters(model):
    with torch.no_grad():  # as if trained: B is no longer zero
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.05)


def test_lora_starts_at_the_base_model_trains_only_adapters_and_equals_its_merge():
    model = ours_from_hf(hf_model(num_key_value_heads=2))
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "mlp.*"]))
    assert len(names) == 2 * 5 and all(("q_proj" in n or "v_proj" in n or ".mlp." in n) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base)  # B = 0: training starts from the base model
    trained_adapters(model)
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)


def test_rslora_scaling_and_peft_names():
    model = ours_from_hf(hf_model())
    apply_lora(model, LoRAConfig(r=16, alpha=8, rslora=True, targets=["k_proj"]))
    m = get_module(model, "model.layers.0.self_attn.k_proj")
    assert m.scaling == pytest.approx(8 / 4)
    assert set(adapter_state(model)) == {
        f"base_model.model.model.layers.{i}.self_attn.k_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }


def test_qlora_forward_is_dequantized_nf4_plus_the_adapter():
    model = ours_from_hf(hf_model(num_key_value_heads=2, hidden_size=64, intermediate_size=128))
    quantize_base_nf4(model, QLoRAConfig(block_size=64, double_quant=True))
    apply_lora(model, LoRAConfig(r=4, alpha=4, targets=["q_proj", "down_proj"]))
    trained_adapters(model)
    m = get_module(model, "model.layers.1.mlp.down_proj")
    assert type(m.base).__name__ == "NF4Linear" and m.base.qweight.dtype == torch.uint8  # stays packed
    x = torch.randn(3, 5, 128)
    expected = x @ (m.base.dequantize() + m.delta_weight()).T
    torch.testing.assert_close(m(x), expected, atol=1e-4, rtol=1e-4)
    # gradients reach the adapters only, through the packed base
    m(x).sum().backward()
    assert m.lora_A.weight.grad is not None and not any(p.requires_grad for p in m.base.parameters())


def test_targets_that_match_nothing_are_named():
    model = ours_from_hf(hf_model())
    with pytest.raises(LlamalabError, match=r"match no module; the model has down_proj, gate_proj, k_proj"):
        apply_lora(model, LoRAConfig(targets=["query"]))


def test_iec_paths_equal_their_written_out_form_and_merge():
    from llamalab.model.linear import Linear

    torch.manual_seed(0)
    base = Linear(32, 48, bias=False)
    m = LoRALinear(base, r=4, alpha=8, iec=True)
    with torch.no_grad():
        m.lora_B.weight.normal_()
        m.lora_default_A_scale.fill_(0.7)
        m.lora_default_B_scale.fill_(-0.3)
    x = torch.randn(5, 32)
    # written out: group means of x (4 groups of 8 inputs), each h_g repeated over 12 outputs
    h = x @ m.lora_A.weight.T + 0.7 * torch.stack([x[:, 8 * g : 8 * g + 8].mean(1) for g in range(4)], 1)
    u = h @ m.lora_B.weight.T - 0.3 * h.repeat_interleave(12, dim=1)
    torch.testing.assert_close(m(x), base(x) + 2.0 * u)
    torch.testing.assert_close(x @ (base.weight + m.delta_weight()).T, m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(LlamalabError, match="divisible by r=5"):
        LoRALinear(base, r=5, alpha=8, iec=True)


def test_icq_shifts_raise_the_code_entropy_and_dequantize_with_the_shift():
    from llamalab.quant.nf4 import NF4_TABLE, NF4Linear, code_entropy, quantize_blockwise, unpack_nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02 + 0.004 * torch.randn(64, 1, generator=g)  # shifted rows
    plain = NF4Linear.from_weight(w, None, 64, True, icq=False)
    icq = NF4Linear.from_weight(w, None, 64, True, icq=True)
    h_plain = code_entropy(unpack_nf4(plain.qweight), 64).mean()
    h_icq = code_entropy(unpack_nf4(icq.qweight), 64).mean()
    assert h_icq > h_plain
    assert icq.native_fits() is False and icq.spec()["icq"] is True
    # dequantization adds back the stored (8-bit) shift
    shift = icq.block_shift()
    codes, _ = quantize_blockwise(w.reshape(-1, 64) - shift[:, None], NF4_TABLE, 64)
    assert (icq.dequantize() - w).abs().mean() < (plain.dequantize() - w).abs().mean() * 1.5
    assert shift.shape == (w.numel() // 64,) and codes.numel() == w.numel()


@pytest.mark.slow
def test_icq_raises_the_entropy_of_real_weights(smollm):
    from llamalab.quant.nf4 import NF4Linear, code_entropy, unpack_nf4

    w = (
        get_module(smollm.model, "model.layers.10.mlp.down_proj")
        .weight.detach()[:, :512]
        .float()
        .contiguous()
    )
    plain, icq = NF4Linear.from_weight(w, None, icq=False), NF4Linear.from_weight(w, None, icq=True)
    h_plain = code_entropy(unpack_nf4(plain.qweight), 64).mean()
    h_icq = code_entropy(unpack_nf4(icq.qweight), 64).mean()
    assert h_icq > h_plain + 0.01, (h_plain, h_icq)
