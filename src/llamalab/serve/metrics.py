"""Server metrics in the Prometheus text exposition format (version 0.0.4).

A handful of counters, gauges and histograms, written out by hand: the format is a few lines of text and
this keeps a monitoring library out of the dependencies. Updated from the event loop and the engine thread,
so every change holds one lock. Names follow Prometheus conventions (`_total` for counters, base units).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """Everything `/metrics` reports."""

    WINDOW_S = 10.0  # the generation-rate gauge averages over this many seconds

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.refused: dict[str, int] = {}  # connections answered and closed below the app, by reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.decode_rate = _Histogram(RATE_BUCKETS)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the windowed rate
        self.queue_depth = 0
        self.running = 0
        self.capacity = 0

    def request_done(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def connection_refused(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def add_prompt_tokens(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def add_generated(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += n
            self.recent.append((now, n))
            self._trim(now)

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_sequence(self, n_tokens: int, decode_seconds: float) -> None:
        """A finished sequence: its decode rate (tokens after the first, over the time after the first)."""
        if n_tokens > 1 and decode_seconds > 0:
            with self.lock:
                self.decode_rate.observe((n_tokens - 1) / decode_seconds)

    def set_load(self, waiting: int, running: int, capacity: int) -> None:
        with self.lock:
            self.queue_depth, self.running, self.capacity = waiting, running, capacity

    def _trim(self, now: float) -> None:
        while self.recent and now - self.recent[0][0] > self.WINDOW_S:
            self.recent.popleft()

    def render(self) -> str:
        """The Prometheus text for a scrape."""
        with self.lock:
            self._trim(time.monotonic())
            rate = sum(n for _, n in self.recent) / self.WINDOW_S
            lines = [
                "# HELP llamalab_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE llamalab_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'llamalab_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# HELP llamalab_connections_refused_total Connections answered and closed before reaching the "
                "API: too many open, request headers too slow, or a request that is not valid HTTP.",
                "# TYPE llamalab_connections_refused_total counter",
            ]
            for reason, n in sorted(self.refused.items()):
                lines.append(f'llamalab_connections_refused_total{{reason="{reason}"}} {n}')
            lines += [
                "# HELP llamalab_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE llamalab_prompt_tokens_total counter",
                f"llamalab_prompt_tokens_total {self.prompt_tokens}",
                "# HELP llamalab_generation_tokens_total Tokens generated.",
                "# TYPE llamalab_generation_tokens_total counter",
                f"llamalab_generation_tokens_total {self.generation_tokens}",
                "# HELP llamalab_time_to_first_token_seconds From arrival to the first generated token.",
                "# TYPE llamalab_time_to_first_token_seconds histogram",
                *self.ttft.lines("llamalab_time_to_first_token_seconds"),
                "# HELP llamalab_sequence_decode_tokens_per_second Decode rate of each finished sequence.",
                "# TYPE llamalab_sequence_decode_tokens_per_second histogram",
                *self.decode_rate.lines("llamalab_sequence_decode_tokens_per_second"),
                f"# HELP llamalab_generation_tokens_per_second Tokens generated per second, all sequences, "
                f"over the last {self.WINDOW_S:g} s.",
                "# TYPE llamalab_generation_tokens_per_second gauge",
                f"llamalab_generation_tokens_per_second {_num(rate)}",
                "# HELP llamalab_queue_depth Sequences waiting for a free batch slot.",
                "# TYPE llamalab_queue_depth gauge",
                f"llamalab_queue_depth {self.queue_depth}",
                "# HELP llamalab_running_sequences Sequences in the running batch.",
                "# TYPE llamalab_running_sequences gauge",
                f"llamalab_running_sequences {self.running}",
                "# HELP llamalab_batch_slots Batch slots (--max-batch).",
                "# TYPE llamalab_batch_slots gauge",
                f"llamalab_batch_slots {self.capacity}",
            ]
        return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return "NaN" if math.isnan(x) else f"{x:.3f}"
