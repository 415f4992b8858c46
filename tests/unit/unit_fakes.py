"""Test doubles shared by the unit tests (imported as a top-level module: the
test directories have no __init__.py; the name avoids collisions)."""

from __future__ import annotations

import threading


class FakeClock:
    """A clock.Clock whose time moves only when the test calls `advance`.

    A wait ends when its condition is notified or time is advanced, never by
    itself, so deadline tests do not depend on the machine's speed. No wakeup
    is lost: a thread that read the time before an advance and waits after it
    returns at once (it looks again), and `wait_for_sleeper` lets a test
    advance only once a thread is asleep on a timeout (a retry's backoff)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._generation = 0  # advances so far
        self._seen = threading.local()  # the generation each thread last read
        self._lock = threading.Condition()
        self._conditions: set[threading.Condition] = set()
        self._sleepers = 0  # threads waiting with a finite timeout

    def now(self) -> float:
        with self._lock:
            self._seen.generation = self._generation
            return self._now

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            if getattr(self._seen, "generation", self._generation) != self._generation:
                return  # time moved since this thread looked
            self._conditions.add(cond)
            if timeout is not None:
                self._sleepers += 1
                self._lock.notify_all()
        try:
            cond.wait()  # the caller holds `cond`; advance() notifies it
        finally:
            if timeout is not None:
                with self._lock:
                    self._sleepers -= 1

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            self._generation += 1
            conditions = list(self._conditions)
        for cond in conditions:
            with cond:
                cond.notify_all()

    def wait_for_sleeper(self, timeout: float = 30.0) -> bool:
        """Blocks (real time, as a guard) until a thread sleeps on a timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._sleepers > 0, timeout)
