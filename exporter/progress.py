"""Progress of long export stages: a tqdm bar on a terminal, a log line every 10% (or 30 s) otherwise.

An export of a 12B checkpoint runs for minutes; whether its stderr is a terminal or a CI log, the user should
see what it is doing and how far it got. Stages log through the `gemma3.exporter` logger, which the CLI shows
at INFO by default (`gemma3-export -v` adds details, third-party loggers stay at WARNING).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger("gemma3.exporter")
LOG_EVERY_S = 30.0  # without a terminal: at least one line this often, and one per 10% of the work


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Log `what`, run the block, log how long it took."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def _size(n: float, unit: str) -> str:
    return f"{n / 2**30:.2f} GiB" if unit == "B" else f"{int(n)} {unit}"


class Progress:
    """Thread-safe counter of work done out of `total` (bytes when unit is "B")."""

    def __init__(self, what: str, total: float, unit: str = "B"):
        self.what, self.total, self.unit = what, total, unit
        self.done, self._lock = 0.0, threading.Lock()
        self._start = self._last_log = time.perf_counter()
        self._last_tenth = 0
        self._bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
            self._bar = tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024 if unit == "B" else 1000, leave=False)

    def update(self, amount: float) -> None:
        with self._lock:
            self.done += amount
            if self._bar is not None:
                self._bar.update(amount)
                return
            now, tenth = time.perf_counter(), int(10 * self.done / max(self.total, 1))
            if tenth > self._last_tenth or now - self._last_log >= LOG_EVERY_S:
                self._last_tenth, self._last_log = tenth, now
                log.info("%s: %3.0f%% (%s of %s, %.0f s)", self.what, 100 * self.done / max(self.total, 1),
                         _size(self.done, self.unit), _size(self.total, self.unit), now - self._start)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        log.info("%s: %s in %.1f s", self.what, _size(self.total, self.unit), time.perf_counter() - self._start)
