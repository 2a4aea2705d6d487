"""GGUF loading: every tensor type against transformers' own GGUF reader, the Q/K un-permutation, and
truncated files."""

import pytest
import torch

import llamalab
from llamalab.errors import CheckpointError
from llamalab.io.gguf import permute_qk, unpermute_qk
from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def tiny_pair():
    tok = tiny_bpe()
    # K-quants need rows that are multiples of 256.
    hf = hf_model(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return hf, tok


def test_every_tensor_type_dequantizes_as_transformers_reads_it(tmp_path, tiny_pair):
    from transformers import AutoModelForCausalLM

    hf, tok = tiny_pair
    path = tmp_path / "tiny-mixed.gguf"
    write_tiny_gguf(path, hf, tok, TYPES)  # one file, the types spread over its 20 matrices
    ours = llamalab.load(str(path))
    assert set(ours.checkpoint.tensor_types.values()) == set(TYPES)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    for name, tensor in ours.model.state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name], atol=0, rtol=0, msg=name)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_f32_gguf_reproduces_the_original_weights(tmp_path, tiny_pair):
    hf, tok = tiny_pair
    write_tiny_gguf(tmp_path / "m.gguf", hf, tok, "F32")
    ours = llamalab.load(str(tmp_path / "m.gguf"))
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(ours.model.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("original", [8192, 50])
def test_llama3_rope_freqs_tensor_is_read_as_the_scaling(tmp_path, original):
    """Llama 3.x GGUFs carry RoPE scaling as `rope_freqs` divisors (convert_hf_to_gguf.py's formula)."""
    import math

    from llamalab.model.rope import base_inv_freq

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    scaling["original_max_position_embeddings"] = original
    tok = tiny_bpe()
    hf = hf_model(vocab_size=tok.get_vocab_size(), num_key_value_heads=2, rope_scaling=scaling)
    factors = []
    for freq in base_inv_freq(16, 10000.0).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / 4.0:
            factors.append(1.0)
        elif wavelen > original / 1.0:
            factors.append(8.0)
        else:
            smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    write_tiny_gguf(tmp_path / "l3.gguf", hf, tok, "F32", rope_freqs=torch.tensor(factors))
    ours = llamalab.load(str(tmp_path / "l3.gguf"))
    # 8192 is Llama 3.1's own setting and is recognised; 50 is not, so the raw divisors are used.
    assert ours.config.rope_scaling["rope_type"] == ("llama3" if original == 8192 else "freq_factors")
    ids = torch.randint(0, 300, (1, 120))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_qk_permutation_round_trips():
    w = torch.randn(6 * 64, 40)
    assert torch.equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not torch.equal(permute_qk(w, 6), w)


def test_truncated_gguf_names_the_file(tmp_path, tiny_pair):
    hf, tok = tiny_pair
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path, hf, tok, "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        llamalab.load(str(path))
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match="cut.gguf"):
        llamalab.load(str(path))


def test_non_llama_gguf_is_refused(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        llamalab.load(str(path))


@pytest.mark.slow
def test_default_model_matches_transformers_on_real_text(smollm, smollm_path, alice_text):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    ).eval()
    ids = smollm.encode(alice_text[2000:4000], add_special_tokens=False)[:320]
    assert len(ids) >= 300
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(smollm.logits(ids), expected, atol=1e-3, rtol=0)
        want = ref.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    got = smollm.generate_sequences([ids], max_new_tokens=64, ignore_eos=True)[0].output_ids
    assert got == want[0, len(ids) :].tolist()
