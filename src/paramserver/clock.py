"""Time for the server's threads, injectable: the deadline timer reads `now()`
and sleeps with `wait()`, so tests drive deadlines with a fake clock instead of
real seconds (and hold on a busy machine). Imports only the standard library.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Waits on `cond` (held by the caller) until notified or until
        `timeout` seconds of this clock have passed (None: no limit)."""


class SystemClock:
    """The real monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        # threading refuses waits past TIMEOUT_MAX (OverflowError); callers loop.
        cond.wait(None if timeout is None else min(max(0.0, timeout), MAX_WAIT))


# Longest single wait (callers look again after it): far below threading.TIMEOUT_MAX.
MAX_WAIT = 3600.0
