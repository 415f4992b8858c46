"""The round state machine: who is registered, which round is open, who has sent,
when the barrier is reached, and what happens when a round's deadline passes.

Pure and sans-I/O in the manner of h11: inputs go in as method calls, decisions
come out as return values, and an illegal input raises one of our errors and
leaves the state untouched (every method checks everything before it mutates).
It holds no lock and must not import grpc, torch, threading, socket or time; the
transport owns the lock, and time is passed in as `now`.

Rules, all of them here:
- Round 1 opens once `clients` clients have registered. Every round's cohort is
  the set of active clients at the moment it opens.
- A client that registers while a round is open (or being aggregated) takes part
  from the next round. While a round waits for clients, the active clients may
  already send their updates for it (early updates; their acknowledgement says
  `expected` 0: the cohort is not known yet). Registration is idempotent: a
  known name keeps its slot, becomes active again, and is told which round it
  takes part in next (the open or waiting one if its update for it is still
  missing and it may send one, else the next).
- A round closes when every member of its cohort has sent one update (the
  barrier). The updates come out in canonical order (sorted client ids), which
  is what makes the global model independent of arrival order.
- The deadline. With a `round_timeout` T, a round waits for each of its
  clients at most T longer than its fastest client took: a client that could
  start at time s (when the round began, or when it registered while the round
  waited for clients) is late after s + fastest + T, where `fastest` is the
  shortest time from start to update of any update of the round (the round is
  late once every client that has not sent is). So the clock runs once the
  first update is in, the deadline measures the spread between clients and not
  how long training takes (a slow first round, a cold start or a large
  download, costs every client alike), and every client waiting at the
  barrier has a deadline running. An open round that has received nothing
  uses the last round's fastest time instead (once there was one), so that a
  round whose whole cohort died still ends. A `tick(now)` at or after the deadline closes
  the round with the updates it has if there are at least `min_clients`, else
  aborts it: its updates are discarded, the global model stays, and the next
  round begins. A round still waiting for clients is treated the same way, its
  active clients standing in for the cohort. Cohort members that sent nothing
  become inactive (dropouts) and are left out of later cohorts until they
  register again, so a dead client never holds up more than one round. Before
  the run's first update there is no deadline: nothing is known of how long
  a round takes, and nobody waits at a barrier.
- Sampling (optional): a round's cohort is `sample(round, active clients)`,
  a pure function (sampling.py), and a round after the first opens once
  `min_available` clients are active. The clients not drawn are told to wait
  for a later round (`assignment`); nobody sends early, since the cohort of a
  round that has not opened is not known.
- `assignment(client, after_round)` answers what a client that has the global
  model of `after_round` does next: train for the open round (it is in the
  cohort and has not sent), wait for the open round's model (it is not), or
  nothing yet (the next round has not opened; ask again when it has).
- A closed round is AGGREGATING until the transport reports the global model
  published; then the next round opens, or the run is FINISHED after
  `total_rounds`. The transport may instead report that the aggregation
  cannot finish (secure aggregation lost too many clients): the round is
  aborted like one that missed its quorum. Secure aggregation may also
  withdraw cohort members that can no longer send (left out of its key
  exchange): they become dropouts at once, and the round closes if everyone
  left has sent. A round after the first opens once
  `min_clients` clients are active; until then the machine waits for clients
  again.
- The same update (same digest) sent again for a round is a duplicate: counted
  once and acknowledged again, also just after the round closed (the retry of
  an upload whose acknowledgement was lost). A different one is refused; the
  first is kept.
- Rounds between the last published round and the open round were aborted.

The generic payload `P` is whatever the transport keeps for an update (a spool
file, a state_dict); the machine never looks inside it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from paramserver.errors import (
    CapacityError,
    ConflictingUpdateError,
    FutureRoundError,
    InvalidClientNameError,
    NotInCohortError,
    ParamServerError,
    RoundAbortedError,
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
    PUBLISH = "publish"
    DEADLINE = "deadline"
    ABORT = "abort"
    WITHDRAW = "withdraw"


class IllegalTransitionError(ParamServerError):
    """An input the current phase does not accept. From the transport, a bug."""


@dataclass(frozen=True)
class Registration:
    """`first_round`: the round to send an update for next. `model_round`: the
    round whose global model to train on (first_round - 1, or the last
    published round when rounds in between were aborted)."""

    client_id: str
    first_round: int
    is_new: bool
    model_round: int


@dataclass(frozen=True)
class Update(Generic[P]):
    client_id: str
    digest: bytes
    payload: P


@dataclass(frozen=True)
class Accepted(Generic[P]):
    """The outcome of a submit. `expected` is the size of the round's cohort, 0
    while the round waits for clients. `closed` holds the round's updates in
    canonical order when this update completed the barrier; the caller must
    aggregate them and then call `published`."""

    round: int
    duplicate: bool
    received: int
    expected: int
    closed: tuple[Update[P], ...] | None = None


@dataclass(frozen=True)
class Aborted(Generic[P]):
    """A round aborted at its deadline below quorum; `discarded` are its updates."""

    round: int
    discarded: tuple[Update[P], ...]


@dataclass(frozen=True)
class LastRound:
    """What a restart knows of the last published round: its cohort's size and
    the digests of its updates (to recognise the retry of a lost ack)."""

    cohort_size: int
    digests: Mapping[str, bytes]


@dataclass(frozen=True)
class RoundTiming:
    """The fastest times (seconds from start to update) a restart knows: the
    open round's, and the last round's with an update. None: not known."""

    fastest: float | None = None
    previous: float | None = None


class Role(enum.Enum):
    TRAIN = "train"  # train on model_round, send for round
    WAIT = "wait"  # fetch the global model of round (when it is out), then ask again
    FINISHED = "finished"  # the run is over: round is the final model's


@dataclass(frozen=True)
class Assignment:
    role: Role
    round: int
    model_round: int


class ModelStatus(enum.Enum):
    READY = "ready"
    PENDING = "pending"


@dataclass
class RoundMachine(Generic[P]):
    """The barrier of a synchronous parameter server. See the module docstring.

    `clients`: registrations round 1 waits for. `min_clients`: the quorum, the
    updates a round needs to close at its deadline (and the active clients a
    round after the first needs to open)."""

    clients: int
    total_rounds: int = 0
    capacity: int = 1024
    round_timeout: float | None = None
    min_clients: int = 1
    phase: Phase = Phase.WAITING_FOR_CLIENTS
    open_round: int = 1
    published_round: int = 0
    opened_at: float | None = None
    # When each client of the open round (or of the cohort it waits for) could
    # start on it, and the shortest time any of them took to send: the deadline.
    ready_at: dict[str, float] = field(default_factory=dict)
    fastest: float | None = None
    previous_fastest: float | None = None  # of the last round that had an update
    registered: dict[str, int] = field(default_factory=dict)  # name -> round registered in
    inactive: set[str] = field(default_factory=set)
    cohort: frozenset[str] = frozenset()
    received: dict[str, Update[P]] = field(default_factory=dict)
    # Digests of the last published round, so that a retry whose first
    # acknowledgement was lost is still recognised as a duplicate.
    last_digests: dict[str, bytes] = field(default_factory=dict)
    last_cohort_size: int = 0
    # Sampling: the cohort of a round from the active clients (None: all of
    # them), and how many must be active for a round after the first to open
    # (0: min_clients).
    sample: Callable[[int, frozenset[str]], frozenset[str]] | None = field(
        default=None, repr=False, compare=False)
    min_available: int = 0

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError("clients must be at least 1")
        if self.capacity < self.clients:
            raise ValueError("capacity must be at least clients")
        if self.total_rounds < 0:
            raise ValueError("total_rounds must be 0 (no limit) or more")
        if not 1 <= self.min_clients <= self.clients:
            raise ValueError("min_clients must be in 1..clients")
        if self.min_available and self.min_available < self.min_clients:
            raise ValueError("min_available must be at least min_clients")
        if self.round_timeout is not None and self.round_timeout <= 0:
            raise ValueError("round_timeout must be positive")

    # -- inputs ---------------------------------------------------------------

    def register(self, name: str, now: float) -> Registration:
        """Registers `name`, or re-registers it. Raises InvalidClientNameError,
        CapacityError."""
        is_new = self.check_register(name)
        first_round = self._dispatch(Event.REGISTER, name, now)
        assert isinstance(first_round, int)
        return Registration(name, first_round, is_new, self._model_round_for(first_round))

    def submit(self, client_id: str, round: int, digest: bytes, payload: P,
               now: float) -> Accepted[P]:
        """Records an update. Raises UnknownClientError, RoundError subclasses,
        ConflictingUpdateError; on any of them nothing changes."""
        duplicate = self.check_submit(client_id, round, digest)
        if duplicate is not None:
            return duplicate
        self.received[client_id] = Update(client_id, digest, payload)
        took = max(0.0, now - self.ready_at.get(client_id, now))
        self.fastest = took if self.fastest is None else min(self.fastest, took)
        closed = None
        if self.phase is Phase.COLLECTING and self.received.keys() >= self.cohort:
            closed = self._close()
        return Accepted(round, False, len(self.received), self._expected(), closed)

    def published(self, round: int, now: float) -> None:
        """The global model of `round` is published: open the next round."""
        if round != self.open_round:
            raise IllegalTransitionError(f"published round {round}, open is {self.open_round}")
        self._dispatch(Event.PUBLISH, now)

    def withdraw(self, clients: Iterable[str], round: int, now: float,
                 ) -> Accepted[P] | Aborted[P] | None:
        """Cohort members of the open round that can no longer send for it
        (secure aggregation left them out of its key exchange) leave the
        cohort as dropouts do at a deadline. If the rest are fewer than the
        quorum the round is aborted; if they have all sent, it closes
        (returned as by `submit`)."""
        if round != self.open_round:
            raise IllegalTransitionError(f"withdrew from round {round}, open is "
                                         f"{self.open_round}")
        outcome = self._dispatch(Event.WITHDRAW, frozenset(clients), now)
        assert outcome is None or isinstance(outcome, Accepted | Aborted)
        return outcome

    def aggregation_aborted(self, round: int, now: float) -> Aborted[P]:
        """The closed round cannot be aggregated (secure aggregation lost too
        many clients): its updates are discarded, the global model stays and
        the next round begins, as for a round aborted at its deadline."""
        if round != self.open_round:
            raise IllegalTransitionError(f"aborted round {round}, open is {self.open_round}")
        aborted = self._dispatch(Event.ABORT, now)
        assert isinstance(aborted, Aborted)
        return aborted

    def tick(self, now: float) -> Accepted[P] | Aborted[P] | None:
        """Applies the round deadline, if it has passed: returns the closed
        round (aggregate it, then call `published`), the aborted round, or None."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        outcome = self._dispatch(Event.DEADLINE, now)
        assert isinstance(outcome, Accepted | Aborted)
        return outcome

    # -- queries (never mutate) ------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When the open round times out: the latest start of its clients that
        have not sent (of all of them, if every one has) plus the fastest
        client's time plus the timeout. An open round that has received nothing
        yet uses the last round's fastest time instead, so that a round whose
        whole cohort died still ends (and a client that joined during it does
        not wait for ever). None if it cannot time out."""
        if self.round_timeout is None or self.phase not in (Phase.WAITING_FOR_CLIENTS,
                                                            Phase.COLLECTING):
            return None
        fastest = self.fastest
        if fastest is None and self.phase is Phase.COLLECTING:
            fastest = self.previous_fastest
        if fastest is None:
            return None
        members = self.active if self.phase is Phase.WAITING_FOR_CLIENTS else self.cohort
        starts = [self.ready_at.get(m, 0.0) for m in members if m not in self.received]
        if not starts:
            starts = [self.ready_at.get(m, 0.0) for m in members]
        return max(starts, default=0.0) + fastest + self.round_timeout

    def check_register(self, name: str) -> bool:
        """Raises what `register` would raise; True if `name` is new."""
        check_name(name)
        is_new = name not in self.registered
        if is_new and len(self.registered) >= self.capacity:
            raise CapacityError(self.capacity)
        return is_new

    def closes_at_deadline(self) -> bool:
        """Whether a deadline passing now would close the round (else abort it)."""
        return len(self.received) >= self.min_clients

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self.registered.keys() - self.inactive)

    def check_submit(self, client_id: str, round: int, digest: bytes) -> Accepted[P] | None:
        """Raises what `submit` would raise. Returns the acknowledgement if this
        is a duplicate of an update already counted, else None."""
        self._known(client_id)
        if self.phase is Phase.FINISHED and round >= self.open_round:
            raise RunFinishedError(client_id, round, self.open_round)
        if round > self.open_round:
            raise FutureRoundError(client_id, round, self.open_round)
        if round < self.open_round:
            if round == self.published_round and self.last_digests.get(client_id) == digest:
                return Accepted(round, True, len(self.last_digests), self.last_cohort_size)
            raise StaleRoundError(client_id, round, self.open_round)
        # While the round waits for clients, its cohort-to-be is the active
        # clients: they may send early (a fast client need not wait for the
        # last registration); the barrier is checked once the round opens.
        # With sampling the cohort-to-be is not known: nobody sends early.
        waiting = self.phase is Phase.WAITING_FOR_CLIENTS
        if waiting and self.sample is not None:
            raise FutureRoundError(client_id, round, self.open_round)
        if client_id not in (self.active if waiting else self.cohort):
            raise NotInCohortError(client_id, round, self.open_round)
        previous = self.received.get(client_id)
        if previous is None:
            if self.phase is Phase.AGGREGATING:  # closed at its deadline without it
                raise StaleRoundError(client_id, round, self.open_round)
            return None
        if previous.digest != digest:
            raise ConflictingUpdateError(client_id, round)
        return Accepted(round, True, len(self.received), self._expected())

    def assignment(self, client_id: str, after_round: int) -> Assignment | None:
        """What `client_id`, which has the global model of `after_round`, does
        next; None while that is not known yet (the next round has not opened:
        ask again after the next change). Raises UnknownClientError,
        FutureRoundError (after_round is past the open round)."""
        self._known(client_id)
        if self.phase is Phase.FINISHED:
            return Assignment(Role.FINISHED, self.open_round - 1, self.published_round)
        if after_round > self.open_round:
            raise FutureRoundError(client_id, after_round, self.open_round)
        if after_round == self.open_round:
            return None  # it wants the round after the open one
        model_round = self._model_round_for(self.open_round)
        may_send = client_id not in self.received and (
            client_id in self.cohort if self.phase is Phase.COLLECTING
            else self.phase is Phase.WAITING_FOR_CLIENTS and self.sample is None
            and client_id in self.active)
        if may_send:
            return Assignment(Role.TRAIN, self.open_round, model_round)
        if self.phase is Phase.WAITING_FOR_CLIENTS:
            return None  # its cohort is not known yet
        return Assignment(Role.WAIT, self.open_round, model_round)

    def model_status(self, client_id: str, round: int) -> ModelStatus:
        """Whether the global model after `round` can be served now.

        Raises UnknownClientError, StaleRoundError (older than the latest
        published model, which is all the server keeps), RoundAbortedError,
        FutureRoundError or RunFinishedError (later than the open round)."""
        self._known(client_id)
        if round == self.published_round:
            return ModelStatus.READY
        if round < self.published_round:
            raise StaleRoundError(client_id, round, self.open_round)
        if round < self.open_round:
            raise RoundAbortedError(round)
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

    def _register_while_waiting(self, name: str, now: float) -> int:
        self._enrol(name)
        self.ready_at.setdefault(name, now)  # new or back: its clock starts now
        if len(self.active) >= self._needed_to_open():
            self._open(now)
        # A client whose early update is in takes part from the next round.
        return self.open_round + 1 if name in self.received else self.open_round

    def _register_during_run(self, name: str, now: float) -> int:
        self._enrol(name)
        waiting_for_it = (self.phase is Phase.COLLECTING and name in self.cohort
                          and name not in self.received)
        return self.open_round if waiting_for_it else self.open_round + 1

    def _register_after_end(self, name: str, now: float) -> int:
        self._enrol(name)
        return self.open_round

    def _publish(self, now: float) -> None:
        self.published_round = self.open_round
        self.last_digests = {c: u.digest for c, u in self.received.items()}
        self.last_cohort_size = len(self.cohort)
        self._next_round(now)

    def _deadline_while_waiting(self, now: float) -> Accepted[P] | Aborted[P]:
        # The round never opened: its active clients stand in for the cohort.
        self.cohort = self.active
        self.opened_at = now
        return self._deadline(now)

    def _deadline(self, now: float) -> Accepted[P] | Aborted[P]:
        self.inactive |= self.cohort - self.received.keys()
        if self.closes_at_deadline():
            closed = self._close()
            return Accepted(self.open_round, False, len(closed), len(self.cohort), closed)
        aborted = Aborted(self.open_round, self._in_canonical_order())
        self._next_round(now)
        return aborted

    def _withdraw(self, clients: frozenset[str], now: float) -> Accepted[P] | Aborted[P] | None:
        leaving = (self.cohort & clients) - self.received.keys()
        if not leaving:
            return None
        self.cohort -= leaving
        self.inactive |= leaving
        if len(self.cohort) < self.min_clients:
            aborted = Aborted(self.open_round, self._in_canonical_order())
            self._next_round(now)
            return aborted
        if self.received.keys() >= self.cohort:
            closed = self._close()
            return Accepted(self.open_round, False, len(closed), len(self.cohort), closed)
        return None

    def _abort_aggregation(self, now: float) -> Aborted[P]:
        aborted = Aborted(self.open_round, self._in_canonical_order())
        self._next_round(now)
        return aborted

    def _close(self) -> tuple[Update[P], ...]:
        self.phase = Phase.AGGREGATING
        return self._in_canonical_order()

    def _in_canonical_order(self) -> tuple[Update[P], ...]:
        return tuple(self.received[c] for c in sorted(self.received))

    def _next_round(self, now: float) -> None:
        self.received = {}
        self.cohort = frozenset()
        self.ready_at = dict.fromkeys(self.active, now)
        if self.fastest is not None:
            self.previous_fastest = self.fastest
        self.fastest = None
        self.open_round += 1
        if self.total_rounds and self.open_round > self.total_rounds:
            self.phase = Phase.FINISHED
        elif len(self.active) >= self._needed_to_open():
            self._open(now)
        else:
            self.phase = Phase.WAITING_FOR_CLIENTS

    def _open(self, now: float) -> None:
        # Updates sent while the round waited stay (and so does the clock
        # they started). They cannot already complete the cohort:
        # the registration that opens it adds a client that was not active
        # before, so it has not sent. (With sampling nobody sent.)
        self.phase = Phase.COLLECTING
        self.cohort = self.sample(self.open_round, self.active) if self.sample else self.active
        self.opened_at = now

    def _needed_to_open(self) -> int:
        if self.open_round == 1:
            return self.clients
        return self.min_available or self.min_clients

    def _enrol(self, name: str) -> None:
        self.registered.setdefault(name, self.open_round)
        self.inactive.discard(name)

    def _expected(self) -> int:
        """The open round's cohort size; 0 while it waits for clients (its
        cohort is not known until it opens or its deadline passes)."""
        return 0 if self.phase is Phase.WAITING_FOR_CLIENTS else len(self.cohort)

    def _model_round_for(self, first_round: int) -> int:
        before = first_round - 1
        return before if before >= self.open_round else min(before, self.published_round)

    def check_known(self, client_id: str) -> None:
        """Raises UnknownClientError unless `client_id` registered."""
        self._known(client_id)

    def _known(self, client_id: str) -> int:
        try:
            return self.registered[client_id]
        except KeyError:
            raise UnknownClientError(client_id) from None

    # -- recovery -------------------------------------------------------------

    def restore(self, registered: Mapping[str, int], published_round: int, open_round: int,
                cohort: frozenset[str] | None, received: Iterable[Update[P]],
                now: float, last: LastRound | None = None,
                timing: RoundTiming | None = None) -> Accepted[P] | None:
        """Puts a fresh machine in the state a crashed server left on disk:
        `received` are the updates acknowledged for `open_round`, `cohort` that
        round's cohort if it had opened, `last` what is known of the published
        round, `timing` the fastest times recorded before the crash. The open
        round's clients are taken as starting `now` (a restart costs them all
        alike); its fastest time is the recorded one (0 if none was, and it
        has updates). Returns the closed round if those updates
        already complete it (aggregate it, then call `published`)."""
        if self.registered or self.open_round != 1:
            raise IllegalTransitionError("restore needs a fresh machine")
        self.registered = dict(registered)
        self.published_round = published_round
        self.open_round = open_round
        if last is not None:
            self.last_digests = dict(last.digests)
            self.last_cohort_size = last.cohort_size
        if self.total_rounds and open_round > self.total_rounds:
            self.phase = Phase.FINISHED
            return None
        members = self.registered.keys() if cohort is None else cohort
        self.received = {u.client_id: u for u in received if u.client_id in members}
        self.ready_at = dict.fromkeys(members, now)  # a restart restarts the clock
        timing = timing or RoundTiming()
        self.previous_fastest = timing.previous
        self.fastest = (timing.fastest or 0.0) if self.received else None
        if cohort is None:
            self.phase = Phase.WAITING_FOR_CLIENTS
            if len(self.active) >= self._needed_to_open():
                self._open(now)
            return None
        self.phase, self.cohort, self.opened_at = Phase.COLLECTING, cohort, now
        if self.received.keys() >= self.cohort:
            closed = self._close()
            return Accepted(open_round, False, len(closed), len(cohort), closed)
        return None


# Which handler each (phase, event) runs; a missing pair is an illegal input.
# Submissions are not here: `check_submit` decides them from the round numbers,
# since their outcome depends on the round named as much as on the phase.
_TRANSITIONS: dict[tuple[Phase, Event], Callable[..., object]] = {
    (Phase.WAITING_FOR_CLIENTS, Event.REGISTER): RoundMachine._register_while_waiting,
    (Phase.COLLECTING, Event.REGISTER): RoundMachine._register_during_run,
    (Phase.AGGREGATING, Event.REGISTER): RoundMachine._register_during_run,
    (Phase.FINISHED, Event.REGISTER): RoundMachine._register_after_end,
    (Phase.AGGREGATING, Event.PUBLISH): RoundMachine._publish,
    (Phase.AGGREGATING, Event.ABORT): RoundMachine._abort_aggregation,
    (Phase.WAITING_FOR_CLIENTS, Event.DEADLINE): RoundMachine._deadline_while_waiting,
    (Phase.COLLECTING, Event.DEADLINE): RoundMachine._deadline,
    (Phase.COLLECTING, Event.WITHDRAW): RoundMachine._withdraw,
}


def check_name(name: str) -> None:
    """Raises InvalidClientNameError unless `name` is a valid client name."""
    if not name:
        raise InvalidClientNameError(name, "empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidClientNameError(name, f"longer than {MAX_NAME_LENGTH} characters")
    if not set(name) <= _NAME_CHARS:
        raise InvalidClientNameError(name, "allowed characters are A-Z a-z 0-9 . _ -")
