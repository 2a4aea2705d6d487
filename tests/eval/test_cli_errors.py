"""Bad input to `llamalab eval`: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamalab.cli import main


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    code, err = run(["eval", "ppl", "--data", str(tmp_path / "empty.txt")], capsys)
    assert code == 1
    _one_error_line(err, r"empty.txt: the file is empty")


def test_empty_folder_and_missing_path(tmp_path, capsys):
    code, err = run(["eval", "ppl", "--data", str(tmp_path)], capsys)
    assert code == 1
    _one_error_line(err, r"no text files")
    code, err = run(["eval", "ppl", "--data", str(tmp_path / "nope.txt")], capsys)
    assert code == 1
    _one_error_line(err, r"nope.txt: not a file, a folder or a known dataset \(known: c4, ptb, wikitext2\)")


def test_unknown_or_unreachable_dataset_offline(capsys):
    code, err = run(["eval", "ppl", "--data", "wikitext103"], capsys)
    assert code == 1
    _one_error_line(err, r"wikitext103: not a file, a folder or a known dataset")
    code, err = run(["eval", "ppl", "--data", "wikitext2"], capsys)  # known, but needs the network
    assert code == 1
    _one_error_line(err, r"dataset 'wikitext2'")
    code, err = run(["eval", "choice", "--task", "hellaswag"], capsys)
    assert code == 1
    _one_error_line(err, r"task 'hellaswag'")


def test_malformed_jsonl(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n{oops\n')
    code, err = run(["eval", "choice", "--task", str(tmp_path / "t.jsonl")], capsys)
    assert code == 1
    _one_error_line(err, r"t.jsonl:2: not valid JSON")


def test_bad_lengths_and_unknown_kv(capsys):
    code, err = run(["eval", "passkey", "--lengths", "1K,two"], capsys)
    assert code == 1
    _one_error_line(err, r"cannot read length 'two'")


@pytest.mark.slow
def test_text_shorter_than_one_window(tmp_path, capsys, shared_model):
    (tmp_path / "short.txt").write_text("Alice was beginning to get very tired of sitting by her sister.")
    code, err = run(["eval", "ppl", "--data", str(tmp_path / "short.txt"), "--seq-len", "256"], capsys)
    assert code == 1
    _one_error_line(err, r"the text has \d+ tokens, fewer than one window of 256 \(--seq-len\)")


@pytest.mark.slow
def test_length_beyond_context_without_scaling(capsys, shared_model):
    code, err = run(["eval", "passkey", "--lengths", "4K,16K"], capsys)
    assert code == 1
    _one_error_line(
        err, r"passkey length 16384 needs 16384 tokens, beyond the model's context of 8192.*--rope-scaling"
    )
    code, err = run(["eval", "needle", "--lengths", "9000"], capsys)
    assert code == 1
    _one_error_line(err, r"beyond the model's context of 8192")
    code, err = run(["eval", "ppl", "--data", "tests", "--seq-len", "10000"], capsys)
    assert code == 1


@pytest.mark.slow
def test_kv_method_without_chunks_is_refused(capsys, cloze_jsonl, shared_model):
    code, err = run(["eval", "choice", "--task", str(cloze_jsonl), "--kv", "nosuch"], capsys)
    assert code == 1
    _one_error_line(err, r"unknown --kv 'nosuch'; known: .*dense")

    from llamalab.kv.dense import DenseCache
    from llamalab.kv.registry import register_kv_cache

    register_kv_cache("test-chunkless")(lambda s, c, n, b, dt, dev: DenseCache.for_model(c, n, b, dt, dev))
    code, err = run(["eval", "choice", "--task", str(cloze_jsonl), "--kv", "test-chunkless"], capsys)
    assert code == 1
    _one_error_line(err, r"--kv test-chunkless changes no score without --chunk-size")


def test_console_script_exit_status(tmp_path):
    """The installed `llamalab` command itself: status 1 and the one line."""
    (tmp_path / "bad.jsonl").write_text("not json\n")
    exe = [str(Path(sys.executable).with_name("llamalab"))]  # pyproject's [project.scripts] entry
    out = subprocess.run(
        [*exe, "eval", "choice", "--task", str(tmp_path / "bad.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"error: {tmp_path / 'bad.jsonl'}:1: not valid JSON (Expecting value at column 1)"
    )
