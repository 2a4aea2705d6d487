"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character and never show
any part of a stop string.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix yields U+FFFD.
We decode a short window of recent tokens (vLLM's prefix/read offsets) and hold text back while it ends in
U+FFFD. Stop strings are handled by holding back the longest tail of the pending text that is a prefix of
some stop string, so a stop string is always cut before any of it reaches the client.
"""

from __future__ import annotations

from llamalab.io.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class DetokenizeStream:
    """Feed generated token ids one at a time; get back the text that is safe to show."""

    def __init__(
        self, tokenizer: Tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this are decoded and emitted
        self.read_offset = 0
        self.pending = ""  # decoded text not yet shown (could start a stop string)
        self.text = ""  # everything shown so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that may be shown (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence (or nothing printable yet): wait for more tokens
        self.pending += full[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending, self.stopped = self.pending[:at], "", True
                self.text += out
                return out
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation: release what was held back for a stop string that never came."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # trailing tokens that never formed a whole character
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.pending += self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
            self.read_offset = len(self.ids)
        out = self._release()
        if self.stopped:
            return out
        rest, self.pending = self.pending, ""
        self.text += rest
        return out + rest
