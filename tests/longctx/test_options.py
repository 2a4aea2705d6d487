"""--xl3m and --rag through the commands: prompts longer than the context reach the model reduced, settings
land in the report, and conflicting or bad settings are one line."""

from __future__ import annotations

import json

from tests.test_cli import assert_clean_error, run


def test_eval_passkey_beyond_the_context_with_xl3m_and_rag(tiny_dir, tmp_path):
    # The tiny model's context is 256; a 600-token passkey prompt only fits through a reducer.
    proc = run("eval", "passkey", "--model", str(tiny_dir), "--lengths", "600", "--trials", "1")
    assert_clean_error(proc, "beyond the model's context of 256")
    for flags in (
        ["--xl3m", "--xl3m-segment", "64", "--xl3m-key-len", "160"],
        ["--rag", "bm25", "--rag-top-k", "1", "--rag-chunk-words", "60"],
    ):
        out = tmp_path / f"{flags[0][2:]}.json"
        proc = run("eval", "passkey", "--model", str(tiny_dir), "--lengths", "600", "--trials", "1",
                   "--output-json", str(out), *flags)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        assert report["settings"]["lengths"] == [600]
        assert any(k.startswith(flags[0][2:]) for k in report["settings"])
        assert all(r["prompt_tokens"] > 256 for r in report["records"])


def test_generate_with_xl3m_and_bad_reducer_settings(tiny_dir):
    long_prompt = "The cat sat on the mat. " * 120  # well past the 256-token context
    proc = run("generate", "--model", str(tiny_dir), "--prompt", long_prompt, "--max-new-tokens", "4", "--xl3m",
               "--xl3m-segment", "64", "--xl3m-key-len", "128")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--xl3m", "--rag", "bm25"),
                       "choose one")  # fmt: skip
    assert_clean_error(run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--rag", "tfidf"),
                       "unknown --rag retriever 'tfidf'")  # fmt: skip
    assert_clean_error(run("generate", "--model", str(tiny_dir), "--prompt", "hi", "--xl3m", "--xl3m-scorer", "x"),
                       "entropy or nll")  # fmt: skip
