"""HF directories: loading (single, sharded), `convert` back to transformers, and damaged files."""

import json

import pytest
import torch

import llamalab
from llamalab.convert import convert_to_hf
from llamalab.errors import CheckpointError
from tests.tiny import hf_model


@pytest.fixture()
def tiny_dir(tmp_path):
    hf = hf_model(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "m")
    from tests.tiny import tiny_bpe

    tiny_bpe().save(str(tmp_path / "m" / "tokenizer.json"))
    return hf, tmp_path / "m"


def test_hf_directory_loads_with_same_logits(tiny_dir):
    hf, path = tiny_dir
    ours = llamalab.load(str(path))
    ids = torch.randint(0, 400, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    from tests.tiny import tiny_bpe

    tiny_bpe().save(str(tmp_path / "s" / "tokenizer.json"))
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    ours = llamalab.load(str(tmp_path / "s"))
    ids = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_truncated_safetensors_is_reported(tiny_dir):
    _, path = tiny_dir
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llamalab.load(str(path))


def test_non_llama_architecture_is_refused(tiny_dir):
    _, path = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'GPT2LMHeadModel' is not supported"):
        llamalab.load(str(path))


def test_missing_path_and_unknown_alias():
    with pytest.raises(CheckpointError, match="no such file or directory"):
        llamalab.load("/nonexistent/model")
    with pytest.raises(CheckpointError, match="not a known alias"):
        llamalab.load("smollm-9000")


def test_convert_refuses_a_non_empty_directory_and_leaves_nothing_behind(tiny_dir, tmp_path):
    _, path = tiny_dir
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_to_hf(str(path), tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["x"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]


@pytest.mark.slow
def test_convert_default_model_loads_in_transformers_with_same_logits(smollm, tmp_path, alice_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm-hf"
    convert_to_hf("smollm2-135m", out)
    ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = smollm.encode(alice_text[:1500])[:200]
    with torch.no_grad():
        torch.testing.assert_close(ref(torch.tensor([ids])).logits[0], smollm.logits(ids), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "Numbers 12 345 and  spaces 😀"
    assert tok.encode(text, add_special_tokens=False) == smollm.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        smollm.apply_chat_template(messages)
    )
    again = llamalab.load(str(out))  # and our own loader reads the converted directory back
    assert again.eos_token_ids == smollm.eos_token_ids
    torch.testing.assert_close(again.logits(ids), smollm.logits(ids), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_convert_command_writes_fp16_and_bf16(tiny_dir, tmp_path, capsys, dtype, torch_dtype):
    """`llamalab convert --dtype`: the weights stored in that dtype (rounded once, nothing else changed), and
    transformers and our loader compute with them what the original model computes with rounded weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llamalab.cli import main

    hf, path = tiny_dir
    out = tmp_path / f"tiny-{dtype}"
    assert main(["convert", "--model", str(path), "--out", str(out), "--dtype", dtype]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    stored = load_file(str(out / "model.safetensors"))
    original = hf.state_dict()
    assert set(stored) == set(original)
    for name, tensor in stored.items():
        assert tensor.dtype == torch_dtype and torch.equal(tensor, original[name].to(torch_dtype)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]
    rounded = hf_model(num_key_value_heads=2).to(torch_dtype).float()  # the same seed: the same weights
    ids = torch.randint(0, 400, (1, 30))
    with torch.no_grad():
        want = rounded(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(llamalab.load(str(out)).model(ids), want, atol=1e-5, rtol=1e-5)
