"""Continuous batching: one engine thread serves every request, which joins and leaves between decode steps.

The HTTP handlers run on an asyncio loop; the model runs here, on one background thread that owns the
`Engine` (the engine is not thread-safe; nothing else touches it). Each loop iteration:

1. applies cancellations (a client went away): waiting choices are dropped, running sequences are
   `engine.cancel`led, so their batch rows are free before the next step;
2. admits waiting sequences into free rows (`engine.add` only queues the prompt, and reuses a row whose
   cache holds a prefix of it);
3. runs one engine step: a batched decode step for every running sequence, each with its own sampling
   settings, then one chunk of prefill (`--prefill-chunk` tokens), so a long prompt delays the running
   streams by one chunk at a time, never by its whole prefill; each sequence's new text goes to its
   request's `sink` (which, in the server, posts it to the request's asyncio queue with
   `call_soon_threadsafe`).

A request has one or more choices (`n`, or several prompts); each choice is one engine sequence. Admission
control is a bound on sequences in flight: `max_batch` running plus `max_queue` waiting; beyond that
`submit` raises `QueueFull` (the server answers 503 with Retry-After).

This is the iteration-level scheduling of Orca ("Orca: A Distributed Serving System for Transformer-Based
Generative Models", Yu et al., OSDI 2022) with Sarathi's chunked prefill, without batching a prefill chunk
into the decode pass itself, and without vLLM's paged KV memory or preemption (each sequence holds a cache
row of `max_len`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llamalab.errors import LlamalabError
from llamalab.generate.engine import Engine, Sequence, StepEvent, TokenLogprob
from llamalab.generate.sampling import SamplingParams
from llamalab.serve.metrics import Metrics

log = logging.getLogger("llamalab.serve")


class QueueFull(Exception):
    """No room for more sequences: the caller should answer 503 and ask the client to retry."""


@dataclass
class ChoiceEvent:
    """What one choice of a request produced: new text, its token's logprob, or its end."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: TokenLogprob | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" once finished
    n_generated: int = 0
    error: tuple[int, str] | None = None  # (HTTP status, message): the choice failed


@dataclass
class Choice:
    request: Request
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seq: Sequence | None = None
    done: bool = False


@dataclass
class Request:
    """A unit of admission: its choices are generated independently; `sink` receives their events (it is
    called on the engine thread and must not block)."""

    prompts: list[list[int]]  # one per choice
    params: list[SamplingParams]  # one per choice
    sink: Callable[[ChoiceEvent], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.choices = [Choice(self, i, p, sp) for i, (p, sp) in enumerate(zip(self.prompts, self.params))]


class Scheduler:
    """Drives one `Engine` on a background thread; `submit` and `cancel` may be called from any thread."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._waiting: deque[Choice] = deque()
        self._cancels: list[Request] = []
        self._in_flight = 0  # choices submitted and not yet finished (waiting + running)
        self._running: dict[int, Choice] = {}  # id(seq) -> choice (Sequence is not hashable)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llamalab-engine", daemon=True)
        self.metrics.set_load(0, 0, engine.max_batch)

    # --- called from the server's threads ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    def submit(self, request: Request) -> None:
        """Queue a request's choices; raises QueueFull when they do not fit in the bound."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._in_flight + len(request.choices) > self.capacity:
                raise QueueFull(
                    f"the server is busy ({self._in_flight} sequences in flight, room for {self.capacity})"
                )
            self._in_flight += len(request.choices)
            self._waiting.extend(request.choices)
            self._publish_load()
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """Stop all of a request's choices at the next opportunity (before the next decode step)."""
        with self._cv:
            if request.cancelled:
                return
            request.cancelled = True
            self._cancels.append(request)
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancels or self.engine.active):
                    self._cv.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
            for request in cancels:
                self._cancel_now(request)
            self._admit()
            if self.engine.active:
                self._step()
        self._fail_all(503, "the server is shutting down")

    def _cancel_now(self, request: Request) -> None:
        with self._cv:
            kept = [c for c in self._waiting if c.request is not request]
            dropped = len(self._waiting) - len(kept)
            self._waiting = deque(kept)
            self._in_flight -= dropped
        for choice in request.choices:
            if choice.seq is not None and not choice.done:
                self.engine.cancel(choice.seq)
                self._finish(choice)

    def _admit(self) -> None:
        while self.engine.free_rows:
            with self._cv:
                if not self._waiting:
                    return
                choice = self._waiting.popleft()
                if choice.request.cancelled:
                    self._in_flight -= 1
                    continue
            try:
                seq = self.engine.add(choice.prompt_ids, choice.params)
            except LlamalabError as e:
                self._fail(choice, 400, str(e))
                continue
            choice.seq = seq
            self.metrics.add_prompt_tokens(len(choice.prompt_ids))
            if seq.finished:  # nothing to generate (max_tokens 0)
                self._emit(choice, StepEvent(seq, None, "", True))
                continue
            with self._cv:
                self._running[id(seq)] = choice
                self._publish_load()

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # a bug, not a client's fault: fail the batch, keep serving
            log.exception("engine step failed")
            for choice in list(self._running.values()):
                self.engine.cancel(choice.seq)
                self._fail(choice, 500, f"internal error during generation ({type(e).__name__})")
            return
        for event in events:
            choice = self._running.get(id(event.seq))
            if choice is not None:
                self._emit(choice, event)

    def _emit(self, choice: Choice, event: StepEvent) -> None:
        seq = event.seq
        if event.token is not None:
            self.metrics.add_generated(1)
            if len(seq.output_ids) == 1:
                self.metrics.observe_ttft(
                    (seq.first_token_at or time.perf_counter()) - choice.request.arrived
                )
        logprob = None
        if seq.params.logprobs is not None and event.token is not None and seq.logprobs:
            # The token that ended the sequence (EOS or a stop id) is not part of the answer.
            if not (event.finished and seq.finish_reason == "stop" and not seq.detok.stopped):
                logprob = seq.logprobs[-1]
        out = ChoiceEvent(
            choice.index,
            text=event.text,
            token=event.token,
            logprob=logprob,
            finished=event.finished,
            finish_reason=seq.finish_reason if event.finished else None,
            n_generated=len(seq.output_ids),
        )
        if event.finished:  # a logits processor that gave up: the answer is not what it promised
            failure = next((f for p in seq.params.processors if (f := getattr(p, "failure", None))), None)
            out.error = (400, failure) if failure else None
        if event.finished:
            if seq.first_token_at is not None:
                self.metrics.observe_sequence(len(seq.output_ids), time.perf_counter() - seq.first_token_at)
            self._finish(choice)
        self._send(choice.request, out)

    def _fail(self, choice: Choice, status: int, message: str) -> None:
        self._finish(choice)
        self._send(choice.request, ChoiceEvent(choice.index, finished=True, error=(status, message)))

    def _finish(self, choice: Choice) -> None:
        if choice.done:
            return
        choice.done = True
        with self._cv:
            self._in_flight -= 1
            if choice.seq is not None:
                self._running.pop(id(choice.seq), None)
            self._publish_load()

    def _send(self, request: Request, event: ChoiceEvent) -> None:
        if request.cancelled and not event.error:
            return
        try:
            request.sink(event)
        except Exception:  # a sink must never take the engine thread down
            log.exception("event sink failed")

    def _fail_all(self, status: int, message: str) -> None:
        for choice in list(self._running.values()):
            self.engine.cancel(choice.seq)
            self._fail(choice, status, message)
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for choice in waiting:
            self._fail(choice, status, message)

    def _publish_load(self) -> None:  # caller holds self._cv
        running = len(self._running)
        self.metrics.set_load(self._in_flight - running, running, self.engine.max_batch)
