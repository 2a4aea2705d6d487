"""Stop strings: the text before the first one, found in time that does not depend on how many there are or
how long they are, and never showing a character that could still start one."""

import random

from llamalab.generate.stops import StopScan, StopStrings
from tests.costs import line_events


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the stop string that ends first (the longest of those ending there)."""
    best = None
    for s in stops:
        at = text.find(s)
        if at >= 0:
            key = (at + len(s), -len(s))
            if best is None or key < best[0]:
                best = (key, at)
    return (text, False) if best is None else (text[: best[1]], True)


def held_back(seen: str, stops: list[str]) -> int:
    """Length of the longest tail of `seen` that is a proper start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)


def run(text: str, stops: list[str], rng: random.Random) -> tuple[str, bool]:
    """Feed `text` in random pieces; check after each that all but the held-back tail has been shown."""
    scan = StopScan(StopStrings.build(tuple(stops)))
    shown, i = "", 0
    while i < len(text) and not scan.stopped:
        n = rng.randint(1, 4)
        shown += scan.feed(text[i : i + n])
        i = min(i + n, len(text))
        if not scan.stopped:
            assert shown + text[len(shown) : i] == text[:i]
            assert i - len(shown) == held_back(text[:i], stops)
    return shown + scan.flush(), scan.stopped


def test_matches_a_brute_force_reference_on_random_text():
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab c"[: rng.randint(2, 4)]
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert run(text, stops, rng) == reference(text, stops), (text, stops)


def test_the_earliest_end_wins_whatever_the_order():
    for stops in (["abcd", "bc"], ["bc", "abcd"]):
        scan = StopScan(StopStrings.build(tuple(stops)))
        assert scan.feed("xxabcd") == "xxa" and scan.stopped


def test_nothing_is_held_without_stop_strings_and_empty_ones_are_ignored():
    scan = StopScan(StopStrings.build(("",)))
    assert scan.feed("hello") == "hello" and scan.flush() == ""


def feed_cost(stops: tuple[str, ...], text: str) -> int:
    scan = StopScan(StopStrings.build(stops))
    return line_events(lambda: [scan.feed(ch) for ch in text])


def test_work_per_character_does_not_grow_with_the_stop_strings():
    """Sixteen stop strings of 1000 characters that almost match everywhere (the worst case for a scan that
    compares strings) cost a small constant factor of one single-character stop string per character."""
    text = "a" * 3000
    one = feed_cost(("b",), text)
    many = feed_cost(tuple("a" * 999 + chr(ord("b") + i) for i in range(16)), text)
    assert many <= 2 * one, (many, one)
