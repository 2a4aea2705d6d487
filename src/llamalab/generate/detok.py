"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character and never show
any part of a stop string.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix yields U+FFFD.
We decode a short window of recent tokens (vLLM's prefix/read offsets) and hold text back while it ends in
U+FFFD. The window is bounded: tokens that never become printable text (invalid UTF-8 bytes, skipped special
tokens) are let go after `MAX_WINDOW` tokens, so each token costs the same however long the answer gets.
Stop strings are handled by holding back the longest tail of the text that is a prefix of some stop string
(`stops.StopScan`), so a stop string is always cut before any of it reaches the client.
"""

from __future__ import annotations

from llamalab.generate.stops import StopScan, StopStrings
from llamalab.io.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes, so at most 4 tokens: a longer run of tokens without printable text
# will not become printable (an invalid byte shows as U+FFFD, as decoding the whole answer would show it).
_MAX_CHAR_TOKENS = 4
MAX_WINDOW = 2 * _MAX_CHAR_TOKENS


class DetokenizeStream:
    """Feed generated token ids one at a time; get back the text that is safe to show."""

    def __init__(
        self, tokenizer: Tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this are decoded and emitted
        self.read_offset = 0
        self.scan = StopScan(StopStrings.build(tuple(s for s in (stop or []) if s)))
        self.pieces: list[str] = []  # everything shown so far (joined on demand: appending stays O(1))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def stopped(self) -> bool:
        return self.scan.stopped

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that may be shown (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        upto = len(self.ids)
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix_text):
            if upto - self.read_offset < MAX_WINDOW:
                return ""  # an incomplete UTF-8 sequence (or nothing printable yet): wait for more tokens
            # Too long to be one character: let it go, all but the last tokens, which may start one.
            upto -= _MAX_CHAR_TOKENS - 1
            full = self._decode(self.ids[self.prefix_offset : upto])
        self.prefix_offset, self.read_offset = self.read_offset, upto
        return self._show(self.scan.feed(full[len(prefix_text) :]))

    def flush(self) -> str:
        """At the end of generation: release what was held back for a stop string that never came."""
        if self.stopped:
            return ""
        out = ""
        if self.read_offset < len(self.ids):  # trailing tokens that never formed a whole character
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            out = self.scan.feed(self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :])
            self.read_offset = len(self.ids)
        return self._show(out + self.scan.flush())

    def _show(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text
