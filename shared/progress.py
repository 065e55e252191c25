"""Progress of long loops: a tqdm bar in an interactive terminal, a few plain log lines otherwise.

A bar is drawn only when stderr is a TTY (someone is watching a terminal). A daemon, a Ray worker
or CI gets log lines instead, at each quarter of the way and at the end, so a log file shows how far
a job got without carriage-return noise. Used by training (`client.training.loop`), ingest
(`client.ingest.run`) and prediction (`client.evaluation.predict`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

LOG_LINES = 4
"""Log lines over a loop of known length when there is no terminal (at 25, 50, 75 and 100%)."""


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stderr, looked up now) is a terminal someone is watching."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class Progress:
    """A counter shown as a bar (TTY) or logged (`LOG_LINES` lines and a final one; no TTY).

    `total` may be an estimate (ingest's row count): log lines then stop at 100% and the final
    line gives the real count. Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        desc: str,
        *,
        total: int | None = None,
        unit: str = "it",
        logger: logging.Logger | None = None,
        bar: bool | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.log = logger or logging.getLogger(__name__)
        self.done = 0
        self._logged = 0  # quarters already logged
        self._bar: Any = None
        if interactive() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.total:
            return
        reached = min(LOG_LINES, self.done * LOG_LINES // self.total)
        if reached > self._logged:
            self._logged = reached
            percent = min(100, 100 * self.done // self.total)
            self.log.info("%s: %d/%d %s (%d%%)", self.desc, self.done, self.total, self.unit, percent)

    def close(self, *, failed: bool = False) -> None:
        """Finish the bar, or log the final count unless the last quarter line already said it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif failed:
            self.log.info("%s: stopped after %d %s", self.desc, self.done, self.unit)
        elif not (self.total and self._logged == LOG_LINES and self.done == self.total):
            self.log.info("%s: done, %d %s", self.desc, self.done, self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)


def progress(
    items: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    logger: logging.Logger | None = None,
) -> Iterator[T]:
    """Yield `items`, counting each one on a `Progress` (total: `len(items)` when it has one).

    A loop of at most one item shows and logs nothing: a single batch (the scoring service calls
    `score` once per request batch) has no progress to show."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if total is not None and total <= 1:
        yield from items
        return
    with Progress(desc, total=total, unit=unit, logger=logger) as bar:
        for item in items:
            yield item
            bar.update()
