"""The round state machine: who is registered, which round is open, who has sent,
when the barrier is reached.

Pure and sans-I/O in the manner of h11: inputs go in as method calls, decisions
come out as return values, and an illegal input raises one of our errors and
leaves the state untouched (every method checks everything before it mutates).
It holds no lock and must not import grpc, torch, threading, socket or time; the
transport owns the lock, and any time is passed in as `now`.

Rules, all of them here:
- Round 1 opens once `min_clients` clients have registered. Its cohort is every
  client registered at that moment.
- A client that registers while a round is open (or being aggregated) takes part
  from the next round. Registration is idempotent: a known name keeps its slot.
- A round closes when every member of its cohort has sent one update (the
  barrier). The updates come out in canonical order (sorted client ids), which
  is what makes the global model independent of arrival order.
- A closed round is AGGREGATING until the transport reports the global model
  published; then the next round opens with every registered client as cohort,
  or the run is FINISHED after `total_rounds`.
- The same update (same digest) sent again for a round is a duplicate: counted
  once and acknowledged again, also just after the round closed (the retry of
  an upload whose acknowledgement was lost). A different one is refused; the
  first is kept.

The generic payload `P` is whatever the transport keeps for an update (a spool
file, a state_dict); the machine never looks inside it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from paramserver.errors import (
    CapacityError,
    ConflictingUpdateError,
    FutureRoundError,
    InvalidClientNameError,
    NotInCohortError,
    ParamServerError,
    RunFinishedError,
    StaleRoundError,
    UnknownClientError,
)

P = TypeVar("P")

MAX_NAME_LENGTH = 64
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class Phase(enum.Enum):
    WAITING_FOR_CLIENTS = "waiting_for_clients"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    FINISHED = "finished"


class Event(enum.Enum):
    REGISTER = "register"
    SUBMIT = "submit"
    PUBLISH = "publish"


class IllegalTransitionError(ParamServerError):
    """An input the current phase does not accept. From the transport, a bug."""


@dataclass(frozen=True)
class Registration:
    client_id: str
    first_round: int
    is_new: bool


@dataclass(frozen=True)
class Update(Generic[P]):
    client_id: str
    digest: bytes
    payload: P


@dataclass(frozen=True)
class Accepted(Generic[P]):
    """The outcome of a submit. `closed` holds the round's updates in canonical
    order when this update completed the barrier; the caller must aggregate them
    and then call `published`."""

    round: int
    duplicate: bool
    received: int
    expected: int
    closed: tuple[Update[P], ...] | None = None


class ModelStatus(enum.Enum):
    READY = "ready"
    PENDING = "pending"


@dataclass
class RoundMachine(Generic[P]):
    """The barrier of a synchronous parameter server. See the module docstring."""

    min_clients: int
    total_rounds: int = 0
    capacity: int = 1024
    phase: Phase = Phase.WAITING_FOR_CLIENTS
    open_round: int = 1
    published_round: int = 0
    opened_at: float | None = None
    clients: dict[str, int] = field(default_factory=dict)
    cohort: frozenset[str] = frozenset()
    received: dict[str, Update[P]] = field(default_factory=dict)
    # Digests of the last published round, so that a retry whose first
    # acknowledgement was lost is still recognised as a duplicate.
    last_digests: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min_clients must be at least 1")
        if self.capacity < self.min_clients:
            raise ValueError("capacity must be at least min_clients")
        if self.total_rounds < 0:
            raise ValueError("total_rounds must be 0 (no limit) or more")

    # -- inputs ---------------------------------------------------------------

    def register(self, name: str, now: float) -> Registration:
        """Registers `name`. Raises InvalidClientNameError, CapacityError."""
        _check_name(name)
        if name in self.clients:
            return Registration(name, self.clients[name], is_new=False)
        if len(self.clients) >= self.capacity:
            raise CapacityError(self.capacity)
        first_round = self._dispatch(Event.REGISTER, name, now)
        assert isinstance(first_round, int)
        return Registration(name, first_round, is_new=True)

    def submit(self, client_id: str, round: int, digest: bytes, payload: P) -> Accepted[P]:
        """Records an update. Raises UnknownClientError, RoundError subclasses,
        ConflictingUpdateError; on any of them nothing changes."""
        duplicate = self.check_submit(client_id, round, digest)
        if duplicate is not None:
            return duplicate
        self.received[client_id] = Update(client_id, digest, payload)
        closed = None
        if self.received.keys() >= self.cohort:
            closed = tuple(self.received[c] for c in sorted(self.cohort))
            self.phase = Phase.AGGREGATING
        return Accepted(round, False, len(self.received), len(self.cohort), closed)

    def published(self, round: int, now: float) -> None:
        """The global model of `round` is published: open the next round."""
        if round != self.open_round:
            raise IllegalTransitionError(f"published round {round}, open is {self.open_round}")
        self._dispatch(Event.PUBLISH, now)

    # -- queries (never mutate) ------------------------------------------------

    def check_submit(self, client_id: str, round: int, digest: bytes) -> Accepted[P] | None:
        """Raises what `submit` would raise. Returns the acknowledgement if this
        is a duplicate of an update already counted, else None."""
        first_round = self._known(client_id)
        if self.phase is Phase.FINISHED and round >= self.open_round:
            raise RunFinishedError(client_id, round, self.open_round)
        if round > self.open_round or self.phase is Phase.WAITING_FOR_CLIENTS:
            raise FutureRoundError(client_id, round, self.open_round)
        if round < self.open_round:
            if round == self.published_round and self.last_digests.get(client_id) == digest:
                n = len(self.last_digests)
                return Accepted(round, True, n, n)
            raise StaleRoundError(client_id, round, self.open_round)
        if client_id not in self.cohort:
            assert first_round > round
            raise NotInCohortError(client_id, round, self.open_round)
        previous = self.received.get(client_id)
        if previous is None:
            if self.phase is not Phase.COLLECTING:  # cannot happen: cohort complete
                raise IllegalTransitionError(f"round {round} is {self.phase.value}")
            return None
        if previous.digest != digest:
            raise ConflictingUpdateError(client_id, round)
        return Accepted(round, True, len(self.received), len(self.cohort))

    def model_status(self, client_id: str, round: int) -> ModelStatus:
        """Whether the global model after `round` can be served now.

        Raises UnknownClientError, StaleRoundError (older than the latest
        published model, which is all the server keeps), FutureRoundError or
        RunFinishedError (later than the open round)."""
        self._known(client_id)
        if round == self.published_round:
            return ModelStatus.READY
        if round < self.published_round:
            raise StaleRoundError(client_id, round, self.open_round)
        if self.phase is Phase.FINISHED:
            raise RunFinishedError(client_id, round, self.open_round)
        if round > self.open_round:
            raise FutureRoundError(client_id, round, self.open_round)
        return ModelStatus.PENDING

    # -- transitions ----------------------------------------------------------

    def _dispatch(self, event: Event, *args: object) -> object:
        handler = _TRANSITIONS.get((self.phase, event))
        if handler is None:
            raise IllegalTransitionError(f"{event.value} while {self.phase.value}")
        return handler(self, *args)

    def _register_before_start(self, name: str, now: float) -> int:
        self.clients[name] = 1
        if len(self.clients) >= self.min_clients:
            self._open(now)
        return 1

    def _register_during_run(self, name: str, now: float) -> int:
        self.clients[name] = self.open_round + 1
        return self.open_round + 1

    def _register_after_end(self, name: str, now: float) -> int:
        self.clients[name] = self.open_round
        return self.open_round

    def _publish(self, now: float) -> None:
        self.published_round = self.open_round
        self.last_digests = {c: u.digest for c, u in self.received.items()}
        self.received = {}
        self.open_round += 1
        if self.total_rounds and self.open_round > self.total_rounds:
            self.phase = Phase.FINISHED
            self.cohort = frozenset()
            return
        self._open(now)

    def _open(self, now: float) -> None:
        self.phase = Phase.COLLECTING
        self.cohort = frozenset(self.clients)
        self.opened_at = now

    def _known(self, client_id: str) -> int:
        try:
            return self.clients[client_id]
        except KeyError:
            raise UnknownClientError(client_id) from None


# Which handler each (phase, event) runs; a missing pair is an illegal input.
# SUBMIT is not here: `check_submit` decides it from the round numbers, since
# its outcome depends on the round named as much as on the phase.
_TRANSITIONS: dict[tuple[Phase, Event], Callable[..., object]] = {
    (Phase.WAITING_FOR_CLIENTS, Event.REGISTER): RoundMachine._register_before_start,
    (Phase.COLLECTING, Event.REGISTER): RoundMachine._register_during_run,
    (Phase.AGGREGATING, Event.REGISTER): RoundMachine._register_during_run,
    (Phase.FINISHED, Event.REGISTER): RoundMachine._register_after_end,
    (Phase.AGGREGATING, Event.PUBLISH): RoundMachine._publish,
}


def _check_name(name: str) -> None:
    if not name:
        raise InvalidClientNameError(name, "empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidClientNameError(name, f"longer than {MAX_NAME_LENGTH} characters")
    if not set(name) <= _NAME_CHARS:
        raise InvalidClientNameError(name, "allowed characters are A-Z a-z 0-9 . _ -")
