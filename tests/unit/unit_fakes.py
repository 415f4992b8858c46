"""Test doubles shared by the unit tests (imported as a top-level module: the
test directories have no __init__.py; the name avoids collisions)."""

from __future__ import annotations

import threading


class FakeClock:
    """A clock.Clock whose time moves only when the test calls `advance`: a
    wait ends when its condition is notified or time is advanced, never by
    itself, so deadline tests do not depend on the machine's speed."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._conditions: set[threading.Condition] = set()

    def now(self) -> float:
        return self._now

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        self._conditions.add(cond)
        cond.wait()

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for cond in list(self._conditions):
            with cond:
                cond.notify_all()
