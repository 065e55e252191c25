"""Server-side dynamic batching: requests that arrive within a few milliseconds share one forward pass.

One worker thread owns the model. It takes the first waiting request, then keeps collecting until the
batch holds `max_batch` inputs or `window_s` has passed since that first request, drops what has
expired (its caller already got DEADLINE_EXCEEDED), and scores the rest with `client.predict.score`,
the same function `fedbehavior predict` uses. Texts are padded to the longest in the batch and pooling
is masked, so a session's probabilities do not depend on what it was batched with.

The model is read once per batch from a `ModelSlot`; a reload replaces the slot's value only after
the new model is fully loaded, so a batch in progress finishes on the model it started with and the
next batch uses the new one: no request is dropped or scored by a half-loaded model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from client.predict import Input, inputs_of, score
from shared.schema import Event
from shared.trained import Trained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A model in service: the loaded model, where it came from, and its generation (1, 2, ...)."""

    trained: Trained
    folder: str
    generation: int


class ModelSlot:
    """The model in service; `swap` replaces it atomically (one reference assignment)."""

    def __init__(self, loaded: Loaded) -> None:
        self._loaded = loaded
        self._lock = threading.Lock()  # serialises reloads, never taken on the scoring path

    @property
    def current(self) -> Loaded:
        return self._loaded

    def reload(self, load: Any) -> Loaded:
        """Call `load(folder)` (returns a Trained) outside the scoring path, then swap it in."""
        with self._lock:
            old = self._loaded
            trained = load(old.folder)
            self._loaded = Loaded(trained, old.folder, old.generation + 1)
            return self._loaded


@dataclass
class Pending:
    """One request waiting for the worker: its events, deadline (monotonic) and the result to set."""

    events: list[Event]
    deadline: float | None
    result: Future[tuple[Loaded, list[dict[str, Any]]]] = field(default_factory=Future)
    size: int = 0  # sessions (or customers): what a batch is counted in

    def __post_init__(self) -> None:
        self.size = len({(e.customer_id, e.session_id) for e in self.events})


PRECISIONS = ("fp32", "bf16")
"""fp32: the scores of `fedbehavior predict`. bf16: matrix products in bfloat16 (torch.autocast),
about twice as fast on a CPU with AVX512-BF16 / AMX, probabilities within about 1e-2 of fp32."""


def autocast(trained: Trained, precision: str) -> Any:
    """The autocast context of `precision` on the model's device (a no-op for fp32)."""
    device = next(trained.model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry later (RESOURCE_EXHAUSTED)."""


class Batcher:
    """The scoring worker: `submit` queues a request, the worker thread scores batches of them."""

    def __init__(
        self,
        slot: ModelSlot,
        *,
        max_batch: int = 32,
        window_s: float = 0.004,
        max_queue: int = 1024,
        precision: str = "fp32",
    ) -> None:
        if max_batch < 1 or window_s < 0 or max_queue < 1:
            raise ValueError(
                f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1, "
                f"window_s ({window_s}) >= 0"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.slot, self.max_batch, self.window_s, self.precision = slot, max_batch, window_s, precision
        self._queue: queue.Queue[Pending | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="fedbehavior-scorer", daemon=True)
        self._count_lock = threading.Lock()
        self.submitted = 0  # counters for logs and tests (the others are written by the worker only)
        self.batches = 0
        self.scored = 0
        self.expired = 0
        self._thread.start()

    def submit(
        self, events: list[Event], deadline: float | None
    ) -> Future[tuple[Loaded, list[dict[str, Any]]]]:
        """Queue one request's events; the future gives (model used, rows as `score` returns them)."""
        pending = Pending(events, deadline)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests already queued; retry later") from None
        with self._count_lock:
            self.submitted += 1
        return pending.result

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _collect(self, first: Pending) -> tuple[list[Pending], bool]:
        """`first` and what arrives within the window, up to max_batch inputs; True if told to stop."""
        batch, size = [first], first.size
        until = time.monotonic() + self.window_s
        while size < self.max_batch:
            left = until - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            size += item.size
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self._score(batch)
        while True:  # anything queued behind the stop marker is still answered
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._score([item])

    def _score(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if not p.result.set_running_or_notify_cancel():  # its caller gave up (deadline)
                self.expired += 1
            elif p.deadline is not None and p.deadline <= now:
                self.expired += 1
                p.result.set_exception(TimeoutError("the deadline passed while the request was queued"))
            else:
                live.append(p)
        if not live:
            return
        loaded = self.slot.current  # read once: the whole batch is scored by one model
        try:
            groups: list[list[Input]] = [inputs_of(loaded.trained.task, p.events)[0] for p in live]
            flat = [i for g in groups for i in g]
            with autocast(loaded.trained, self.precision):
                rows = score(loaded.trained, flat, batch_size=max(1, len(flat)))
        except Exception as err:  # a failure answers every request of the batch, never hangs them
            log.exception("scoring a batch of %d requests failed", len(live))
            for p in live:
                p.result.set_exception(err)
            return
        self.batches += 1
        self.scored += len(live)
        start = 0
        for p, group in zip(live, groups, strict=True):
            p.result.set_result((loaded, rows[start : start + len(group)]))
            start += len(group)
