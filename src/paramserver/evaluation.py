"""Federated evaluation: after every k-th round is published, a cohort of
clients (drawn like a training cohort, independently of it) evaluates the new
global model on its own held-out data; the server averages the reports
weighted by num_examples.

An evaluation closes when its whole cohort has reported, or when the next one
opens (the results then cover whoever reported). Pure and sans-I/O: the
coordinator asks and logs; nothing here is durable (a restart loses the open
evaluation, not the training).

Imports sampling and errors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from paramserver.errors import EvaluationClosedError
from paramserver.sampling import Sampling


@dataclass(frozen=True)
class EvaluationResult:
    round: int
    clients: int  # that reported, of `cohort`
    cohort: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass
class _Open:
    round: int
    cohort: frozenset[str]
    reports: dict[str, tuple[int, Mapping[str, float]]] = field(default_factory=dict)

    def result(self) -> EvaluationResult:
        total = sum(n for n, _ in self.reports.values())
        order = sorted(self.reports)
        keys = (set.intersection(*(set(self.reports[c][1]) for c in order)) if order
                else set())
        # Weighted by examples, in client order: the same reports, the same bits.
        metrics = {k: sum(self.reports[c][0] / total * self.reports[c][1][k] for c in order)
                   for k in sorted(keys)}
        return EvaluationResult(self.round, len(order), len(self.cohort), total, metrics)


class Evaluations:
    """`every`: evaluate the model of every k-th round (0: never)."""

    def __init__(self, every: int, sampling: Sampling) -> None:
        self._every = every
        self._sampling = sampling
        self._open: _Open | None = None

    @property
    def enabled(self) -> bool:
        return self._every > 0

    def published(self, round: int, active: frozenset[str]) -> EvaluationResult | None:
        """The model of `round` is out: opens its evaluation if it is one of
        the evaluated rounds; returns the evaluation this closes, if any had
        reports."""
        if not self.enabled or round % self._every:
            return None
        closed = self._close()
        cohort = self._sampling.cohort(round, active, purpose="evaluate")
        self._open = _Open(round, cohort) if cohort else None
        return closed

    def waiting(self) -> bool:
        """Whether an evaluation is open with reports still missing."""
        current = self._open
        return current is not None and current.reports.keys() < current.cohort

    def wants(self, client: str, round: int) -> bool:
        """Whether `client` is to evaluate the model of `round` (and has not)."""
        current = self._open
        return (current is not None and current.round == round and client in current.cohort
                and client not in current.reports)

    def report(self, client: str, round: int, num_examples: int,
               metrics: Mapping[str, float]) -> tuple[bool, EvaluationResult | None]:
        """Records a report: (counted, the result if this completed the
        evaluation). A second report of the same client is not counted.
        Raises EvaluationClosedError if nothing asked for it."""
        current = self._open
        if current is None or current.round != round or client not in current.cohort:
            raise EvaluationClosedError(client, round)
        if client in current.reports:
            return False, None
        current.reports[client] = (num_examples, dict(metrics))
        if current.reports.keys() < current.cohort:
            return True, None
        return True, self._close()

    def _close(self) -> EvaluationResult | None:
        current, self._open = self._open, None
        if current is None or not current.reports:
            return None
        return current.result()
