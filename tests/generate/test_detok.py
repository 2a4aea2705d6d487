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


class CountingTokenizer:
    """Records the longest run of ids any decode call was given."""

    def __init__(self, tok) -> None:
        self.tok, self.longest = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("piece", ["ÿ", "<|im_start|>"])  # an invalid UTF-8 byte; a skipped special token
def test_text_that_never_becomes_printable_is_decoded_in_a_bounded_window(tok, piece):
    """Tokens that add no printable text used to widen the window decoded for every new token without end."""
    counting = CountingTokenizer(tok)
    stream = DetokenizeStream(counting)
    token = tok.backend.token_to_id(piece)
    ids = [token] * 300 + tok.encode(" and then some text")
    shown = "".join(stream.push(i) for i in ids) + stream.flush()
    assert counting.longest <= 16
    assert shown == tok.decode(ids, skip_special_tokens=True)
