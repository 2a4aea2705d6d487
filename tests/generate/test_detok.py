"""Streaming text: whole UTF-8 characters only, stop strings never shown."""

import pytest

from llamalab.generate.detok import DetokenizeStream
from llamalab.io.tokenizer import Tokenizer
from tests.tiny import tiny_bpe


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tiny_bpe(), eos_token="<|im_end|>")


TEXT = "Alice said 'héllo 😀👩‍👩‍👧 世界' and went on: wonderful, wonderland!"


def test_deltas_are_whole_characters_and_add_up(tok):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # multi-byte characters span several byte-level tokens
    stream = DetokenizeStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_leaks(tok):
    stream = DetokenizeStream(tok, stop=["wonderland"])
    shown = ""
    for i in tok.encode(TEXT):
        shown += stream.push(i)
        assert "wonderl" not in shown.replace("wonderful", "")
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped and shown == "Alice said 'héllo 😀👩‍👩‍👧 世界' and went on: wonderful, "


def test_partial_stop_string_is_released_at_the_end(tok):
    stream = DetokenizeStream(tok, stop=["on: wonderX"])
    shown = "".join(stream.push(i) for i in tok.encode(TEXT)) + stream.flush()
    assert shown == TEXT and not stream.stopped
