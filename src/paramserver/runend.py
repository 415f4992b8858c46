"""The end of a run: after the last round, the server serves the final model
until every active client has it (and no evaluation still waits for reports),
or for at most `linger` seconds. Pure; the coordinator's lock guards it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunEnd:
    """After the last round: who has fetched the final model, and whether the
    server may stop serving it (every active client has it, or `linger`
    seconds have passed). Pure; the coordinator's lock guards it."""

    linger: float
    finished_at: float | None = None
    fetched: set[str] = field(default_factory=set)
    reported: bool = False

    def finish(self, now: float) -> bool:
        """The run has just finished: True the first time."""
        first = self.finished_at is None
        if first:
            self.finished_at = now
        return first

    def over(self, active: frozenset[str], now: float, evaluating: bool = False) -> bool:
        """Every active client has the final model (and no evaluation still
        waits for reports), or the linger time has passed."""
        wake = self.wake_at()
        return wake is not None and ((active <= self.fetched and not evaluating)
                                     or now >= wake)

    def wake_at(self) -> float | None:
        if self.finished_at is None or self.reported:
            return None
        return self.finished_at + self.linger
