"""The command line: its output contract, and one-line errors with a non-zero exit for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llamalab
from llamalab import kernels
from llamalab.cli import main
from tests.tiny import hf_model, tiny_bpe, write_tiny_gguf

# The installed console script (pyproject's [project.scripts]), as a user runs it.
LLAMALAB = [str(Path(sys.executable).with_name("llamalab"))]


def run(*args, stdin=None, timeout=300, **env_overrides):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **env_overrides}
    return subprocess.run(
        LLAMALAB + list(args), capture_output=True, text=True, input=stdin, timeout=timeout, env=env
    )


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tok = tiny_bpe()
    hf = hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=64)
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_gguf(path, hf, tok, "F16")
    return path


def test_missing_path():
    assert_clean_error(run("info", "--model", "/no/such/model.gguf"), "/no/such/model.gguf", "no such file")


def test_unknown_alias():
    assert_clean_error(run("generate", "--model", "llama-99b", "--prompt", "hi"), "llama-99b", "known alias")


def test_hub_id_offline_is_one_line():
    proc = run("info", "--model", "HuggingFaceTB/SmolLM2-135M", HF_HUB_OFFLINE="1")
    assert_clean_error(proc, "HuggingFaceTB/SmolLM2-135M", "offline")


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-4096])
    assert_clean_error(run("info", "--model", str(cut)), "cut.gguf", "truncated")


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(64))
    assert_clean_error(run("info", "--model", str(junk)), "junk.gguf")


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert_clean_error(run("info", "--model", str(tmp_path)), "'BertModel' is not supported")


def test_prompt_longer_than_context(tiny_gguf):
    proc = run("generate", "--model", str(tiny_gguf), "--prompt", "Alice " * 100)
    assert_clean_error(proc, "context is 64")


def test_bad_option_value(tiny_gguf):
    proc = run("generate", "--model", str(tiny_gguf), "--prompt", "x", "--top-p", "0")
    assert_clean_error(proc, "top_p")


def test_generate_prints_only_the_generated_text(tiny_gguf):
    import llamalab

    expected = llamalab.load(str(tiny_gguf)).generate("Alice was", max_new_tokens=10)
    proc = run("generate", "--model", str(tiny_gguf), "--prompt", "Alice was", "--max-new-tokens", "10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_info_json(tiny_gguf):
    proc = run("info", "--model", str(tiny_gguf), "--json")
    data = json.loads(proc.stdout)
    assert data["layers"] == 2 and data["context_length"] == 64 and data["bytes_in_memory"] > 0
    assert data["chat_template"].startswith("{% for message")


# Every command the README documents; a command added or lost must show up here.
COMMANDS = {
    "generate",
    "chat",
    "info",
    "convert",
    "bench",
    "serve",
    "quantize",
    "export",
    "eval",
    "train",
    "kv",
    "lab",
    "longrope",
    "rag",
}
EVAL_COMMANDS = {"ppl", "choice", "passkey", "needle"}


def listed_commands(help_text: str) -> set[str]:
    """The names in the "Commands" box of a --help page (continuation lines start with spaces)."""
    box = help_text.partition("Commands")[2]
    return set(re.findall(r"^│ ([a-z][\w-]*) {2,}", box, flags=re.M))


def test_help_lists_every_command_and_each_has_help(capsys):
    top = run("--help")
    assert top.returncode == 0 and listed_commands(top.stdout) == COMMANDS
    assert main(["eval", "--help"]) == 0 and listed_commands(capsys.readouterr().out) == EVAL_COMMANDS
    subcommands = [["eval", c] for c in sorted(EVAL_COMMANDS)] + [["longrope", "search"]]
    for command in [[c] for c in sorted(COMMANDS - {"eval"})] + subcommands:
        assert main([*command, "--help"]) == 0, command
        page = capsys.readouterr().out
        assert "Usage:" in page and " ".join(command) in page and "--help" in page, command


@pytest.mark.slow
def test_default_model_cli_contract(smollm, tmp_path):
    """The inference commands run the default model's GGUF as stored (`--dtype auto`); `--dtype fp32` gives the
    dense model's text, and the stored model's text is the Python API's for the same dtype. (The two differ at
    near-ties: on this chat prompt the fp32 model's first token leads "L" by 0.08 logits, and the stored Q4_1
    head, multiplied on 8-bit activations, picks "L'Étoile" as llama.cpp does on the same file.)"""
    proc = run(
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
        "--dtype",
        "fp32",
    )
    assert proc.returncode == 0 and "Paris" in proc.stdout
    prompt = "The capital of France is"
    raw = run(
        "generate", "--model", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "8", "--dtype", "fp32"
    )
    assert raw.stdout == smollm.generate(prompt, max_new_tokens=8) + "\n"
    stored = run("generate", "--model", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "8")
    assert (
        stored.stdout
        == llamalab.load("smollm2-135m", dtype="stored").generate(prompt, max_new_tokens=8) + "\n"
    )
    bench = run(
        "bench",
        "--model",
        "smollm2-135m",
        "--prompt-tokens",
        "32",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--threads",
        "2",
        "--json",
    )
    result = json.loads(bench.stdout)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    # as stored where the native kernels run (elsewhere `auto` is fp32)
    stored_formats = ["gguf qtype=Q4_1", "gguf qtype=Q8_0"] if kernels.quant_matmul() is not None else []
    assert result["quantized"] == stored_formats
    chat = run(
        "chat",
        "--model",
        "smollm2-135m",
        "--max-new-tokens",
        "16",
        "--dtype",
        "fp32",
        stdin="What is the capital of France?\n/reset\nAnd of Italy?\n/exit\n",
    )
    assert chat.returncode == 0 and "Paris" in chat.stdout and "conversation cleared" in chat.stdout
