"""Measuring work without a clock (tests never assert on time): Python line events and Python memory."""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable


def line_events(fn: Callable[[], object]) -> int:
    """How many Python lines run while `fn` runs (loops written in Python show up here)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak Python memory allocated while `fn` runs (copies of lists and strings show up here)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
