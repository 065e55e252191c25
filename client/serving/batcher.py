"""Server-side dynamic batching: requests share forward passes of at most `max_batch` sessions.

One worker thread owns the model. A request's sessions (or customers) are cut into chunks: a forward pass
never holds more than `max_batch` inputs, and never more than `max_chunk` of one request, whatever it
carries. Many small callers still share passes of up to `max_batch`; one caller's large request goes
`max_chunk` at a time, so the pass a newcomer waits for is short (what keeps an honest caller's latency
while others send the largest requests allowed: `simulations/bench_serve_abuse.py`). Each pass is filled
fairly: requests that have had no pass yet come first, in arrival order, then the chunks of those already
started, least served first (round robin), so a large request's chunks never starve a small request
queued after it: the small one waits at most for the pass in progress. When the queue holds less than a
full pass, the oldest request waits at most `window_s` for company. Requests whose caller gave up
(deadline passed, RPC cancelled) are dropped before their next chunk. Scoring is
`client.evaluation.predict.score`, the function `fedbehavior predict` uses: texts are padded to the
longest in the pass and pooling is masked, so a session's probabilities do not depend on what it was
batched with, nor on how its request was cut. With `serve --runtime onnx|onnx-int8` the model in service
carries an ONNX Runtime session (`Loaded.runner`, client.training.onnx_backbone) that computes the
probabilities instead of the eager model.

A request is scored by the model in service when it was queued (read from a `ModelSlot`); a reload
replaces the slot's value only after the new model is fully loaded, so a request in progress finishes
on the model it started with and requests queued afterwards use the new one: no request is dropped,
scored by a half-loaded model, or by two models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from client.evaluation.predict import Input, inputs_of, score
from shared.schema import Event
from shared.trained import Trained

if TYPE_CHECKING:
    from client.training.onnx_backbone import OnnxRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A model in service: the loaded model, where it came from, its generation (1, 2, ...) and, for
    an ONNX runtime, the session that scores in its place."""

    trained: Trained
    folder: str
    generation: int
    runner: OnnxRunner | None = None


class ModelSlot:
    """The model in service; `swap` replaces it atomically (one reference assignment)."""

    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        self._lock = threading.Lock()  # serialises reloads, never taken on the scoring path

    @property
    def current(self) -> Loaded:
        return self._loaded

    def reload(self, load: Callable[[str], Trained | tuple[Trained, OnnxRunner | None]]) -> Loaded:
        """Call `load(folder)` (a Trained, or a Trained and its ONNX runner) outside the scoring path,
        then swap it in."""
        with self._lock:
            old = self._loaded
            made = load(old.folder)
            trained, runner = made if isinstance(made, tuple) else (made, None)
            self._loaded = Loaded(trained, old.folder, old.generation + 1, runner)
            return self._loaded


Result = tuple[Loaded, list[dict[str, Any]]]


@dataclass
class Pending:
    """One request in the worker's hands: what to score, by which model, until when (monotonic)."""

    loaded: Loaded
    inputs: list[Input]
    deadline: float | None
    arrived: float = field(default_factory=time.monotonic)
    result: Future[Result] = field(default_factory=Future)
    done: int = 0  # inputs scored so far (the request's next chunk starts there)
    taken: int = 0  # inputs handed to a forward pass so far
    rows: list[dict[str, Any]] = field(default_factory=list)
    abandoned: bool = False  # its caller went away after the first chunk

    @property
    def size(self) -> int:
        return len(self.inputs)

    @property
    def left(self) -> int:
        return len(self.inputs) - self.taken

    def cancel(self) -> None:
        """The caller gives up: not scored if still queued, no further chunk if started."""
        self.abandoned = True
        self.result.cancel()


PRECISIONS = ("fp32", "bf16")
"""fp32: the scores of `fedbehavior predict`. bf16: matrix products in bfloat16 (torch.autocast),
about twice as fast on a CPU with AVX512-BF16 / AMX, probabilities within about 1e-2 of fp32.
The torch runtime's setting: an ONNX runtime ignores it (serve refuses the combination)."""


def autocast(trained: Trained, precision: str) -> Any:
    """The autocast context of `precision` on the model's device (a no-op for fp32)."""
    device = next(trained.model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry later (RESOURCE_EXHAUSTED)."""


class Batcher:
    """The scoring worker: `submit` queues a request, the worker thread scores chunks of them."""

    def __init__(
        self,
        slot: ModelSlot,
        *,
        max_batch: int = 32,
        max_chunk: int = 1,
        window_s: float = 0.004,
        max_queue: int = 1024,
        precision: str = "fp32",
        overload_sessions: int = 0,
        on_overload: Callable[[bool], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_chunk < 1 or window_s < 0 or max_queue < 1 or overload_sessions < 0:
            raise ValueError(
                f"max_batch ({max_batch}), max_chunk ({max_chunk}) and max_queue ({max_queue}) must be >= 1, "
                f"window_s ({window_s}) and overload_sessions ({overload_sessions}) >= 0"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.slot, self.max_batch, self.window_s, self.precision = slot, max_batch, window_s, precision
        self.max_chunk = max_chunk
        self.max_queue = max_queue
        # queued sessions past which the server says it is overloaded (0: never), below half: not
        self.overload_sessions, self._on_overload = overload_sessions, on_overload
        self.overloaded = False
        self._pending: list[Pending] = []  # in arrival order; the worker picks fairly among them
        self._queued_inputs = 0  # inputs not yet handed to a forward pass
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fedbehavior-scorer", daemon=True)
        self.submitted = 0  # counters for logs and tests
        self.batches = 0  # forward passes
        self.scored = 0  # requests answered in full
        self.expired = 0  # requests dropped: deadline passed or caller gone
        self._thread.start()

    @property
    def queued_sessions(self) -> int:
        return self._queued_inputs

    def submit(self, events: list[Event], deadline: float | None) -> Pending:
        """Queue one request's events; `.result` gives (model used, rows as `score` returns them)."""
        loaded = self.slot.current  # the model that scores every chunk of this request
        inputs = inputs_of(loaded.trained.task, events)[0]
        pending = Pending(loaded, inputs, deadline)
        if not inputs:  # nothing to score (a customer task with no candidate): answered at once
            pending.result.set_running_or_notify_cancel()
            pending.result.set_result((loaded, []))
            return pending
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down; retry on another instance")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(
                    f"{len(self._pending)} requests already queued (the server's --max-queue); retry later"
                )
            self._pending.append(pending)
            self._queued_inputs += pending.size
            self.submitted += 1
            self._check_load()
            self._cond.notify()
        return pending

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _check_load(self) -> None:
        """Flip `overloaded` past the bound, and back below half of it (called with the lock held)."""
        if not self.overload_sessions:
            return
        if not self.overloaded and self._queued_inputs > self.overload_sessions:
            self.overloaded = True
        elif self.overloaded and self._queued_inputs <= self.overload_sessions // 2:
            self.overloaded = False
        else:
            return
        log.warning(
            "%s: %d sessions queued (bound %d, --overload-sessions)",
            "overloaded" if self.overloaded else "no longer overloaded", self._queued_inputs,
            self.overload_sessions,
        )  # fmt: skip
        if self._on_overload is not None:
            self._on_overload(self.overloaded)

    def _drop(self, p: Pending, error: BaseException | None) -> None:
        """Take `p` out of the queue without scoring the rest of it (lock held)."""
        self._pending.remove(p)
        self._queued_inputs -= p.left
        self.expired += 1
        if not p.result.done():  # started, then abandoned: its waiter (if any) must not hang
            p.result.set_exception(error or CancelledError("the caller went away"))

    def _take(self) -> list[tuple[Pending, int, int]]:
        """The next forward pass: (request, start, stop) chunks, at most max_batch inputs and max_chunk
        of one request (lock held).

        New requests first (arrival order), then started ones, least served first; one model."""
        now = time.monotonic()
        order = sorted(self._pending, key=lambda p: (p.taken > 0, p.taken))  # stable: arrival order
        chunks: list[tuple[Pending, int, int]] = []
        room, loaded = self.max_batch, None
        for p in order:
            if room == 0:
                break
            if p.abandoned or p.result.cancelled():
                self._drop(p, None)  # its caller already has its answer (DEADLINE_EXCEEDED, CANCELLED)
                continue
            if p.deadline is not None and p.deadline <= now:
                self._drop(p, TimeoutError("the deadline passed while the request was queued"))
                continue
            if loaded is not None and p.loaded is not loaded:
                continue  # queued before a reload: a pass of its own model, next
            if p.taken == 0 and not p.result.set_running_or_notify_cancel():
                self._drop(p, None)
                continue
            loaded = p.loaded
            n = min(room, p.left, self.max_chunk)
            chunks.append((p, p.taken, p.taken + n))
            p.taken += n
            room -= n
            self._queued_inputs -= n
            if p.left == 0:
                self._pending.remove(p)
        self._check_load()
        return chunks

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, and everything queued was answered
                head = min(self._pending, key=lambda p: p.arrived)
                if head.taken == 0:  # the oldest request waits a little for company
                    until = head.arrived + self.window_s
                    while self._queued_inputs < self.max_batch and not self._closing:
                        left = until - time.monotonic()
                        if left <= 0 or head.result.cancelled():
                            break
                        self._cond.wait(left)
                chunks = self._take()
            if chunks:
                self._score(chunks)

    def _score(self, chunks: list[tuple[Pending, int, int]]) -> None:
        loaded = chunks[0][0].loaded  # one model for the whole pass (see _take)
        flat = [i for p, start, stop in chunks for i in p.inputs[start:stop]]
        try:
            if loaded.runner is not None:
                rows = score(loaded.trained, flat, batch_size=len(flat), runner=loaded.runner)
            else:
                with autocast(loaded.trained, self.precision):
                    rows = score(loaded.trained, flat, batch_size=len(flat))
        except Exception as err:  # a failure answers every request of the pass, never hangs them
            log.exception("scoring a pass of %d sessions (%d requests) failed", len(flat), len(chunks))
            with self._cond:
                for p, _, _ in chunks:
                    if p in self._pending:
                        self._pending.remove(p)
                        self._queued_inputs -= p.left
                    if not p.result.done():
                        p.result.set_exception(err)
                self._check_load()
            return
        self.batches += 1
        at = 0
        for p, start, stop in chunks:
            p.rows.extend(rows[at : at + stop - start])
            at += stop - start
            p.done = stop
            if p.done == p.size and not p.result.done():
                self.scored += 1
                p.result.set_result((loaded, p.rows))
