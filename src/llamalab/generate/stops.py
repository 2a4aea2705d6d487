"""Stop strings found as text streams in, at a cost per character that does not depend on how many stop
strings there are or how long they are.

An Aho-Corasick automaton over the stop strings (Aho & Corasick, "Efficient string matching", CACM 1975):
its state after each character is the longest tail of the text so far that is the start of some stop
string, which is exactly the text that must be held back (it may still become a stop string), and it knows
when a stop string has just ended. A scan moves through it one character at a time, in amortised O(1)
moves per character. The automaton is built once per set of stop strings (cached: the `n` choices of a
request, and requests that repeat a set, share it).
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache


class StopStrings:
    """The automaton for one set of stop strings (immutable; shared by every scan of that set)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.next: dict[tuple[int, str], int] = {}  # (state, character) -> state: the trie's edges
        self.depth = [0]  # state -> length of the text it stands for
        for s in stops:
            state = 0
            for ch in s:
                if (state, ch) not in self.next:
                    self.next[state, ch] = len(self.depth)
                    self.depth.append(self.depth[state] + 1)
                state = self.next[state, ch]
        ends = {self._find(s) for s in stops if s}
        # fail[s]: the state of the longest proper suffix of s's text that is in the trie.
        # match[s]: length of the longest stop string that s's text ends with (0: none).
        self.fail = [0] * len(self.depth)
        self.match = [self.depth[s] if s in ends else 0 for s in range(len(self.depth))]
        children: dict[int, list[tuple[str, int]]] = {}
        for (state, ch), child in self.next.items():
            children.setdefault(state, []).append((ch, child))
        queue = deque(child for _, child in children.get(0, []))
        while queue:  # breadth first: a state's fail state is shallower, so already known
            state = queue.popleft()
            for ch, child in children.get(state, []):
                self.fail[child] = self.move(self.fail[state], ch)
                self.match[child] = self.match[child] or self.match[self.fail[child]]
                queue.append(child)

    @staticmethod
    @lru_cache(maxsize=16)  # each set of 16 x 1000 characters is ~2 MB
    def build(stops: tuple[str, ...]) -> StopStrings:
        return StopStrings(stops)

    def _find(self, s: str) -> int:
        state = 0
        for ch in s:
            state = self.next[state, ch]
        return state

    def move(self, state: int, ch: str) -> int:
        """The state after `ch` (following fail links from `state` until `ch` extends one)."""
        while state and (state, ch) not in self.next:
            state = self.fail[state]
        return self.next.get((state, ch), 0)


class StopScan:
    """One sequence's scan: feed it text, get back the part that can be shown."""

    def __init__(self, stops: StopStrings) -> None:
        self.stops = stops
        self.state = 0
        self.held = ""  # the tail that may still become a stop string: the state's text
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add `text`; return what may be shown now (nothing after a stop string; never a stop string)."""
        if self.stopped:
            return ""
        pending = self.held + text
        for i, ch in enumerate(text):
            self.state = self.stops.move(self.state, ch)
            ended = self.stops.match[self.state]
            if ended:  # a stop string ends here: show what came before it, and nothing more
                self.stopped, self.held = True, ""
                return pending[: len(pending) - len(text) + i + 1 - ended]
        keep = self.stops.depth[self.state]
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """At the end of generation: release what was held back for a stop string that never came."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
