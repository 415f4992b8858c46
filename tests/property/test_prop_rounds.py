"""Properties of the round barrier (paramserver.rounds.RoundMachine): a stateful
test against a naive model of the rules in the module docstring, a whole run,
and every (phase, input) pair."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from paramserver.errors import (
    CapacityError,
    ConflictingUpdateError,
    FutureRoundError,
    InvalidClientNameError,
    NotInCohortError,
    ParamServerError,
    RoundAbortedError,
    RoundError,
    RunFinishedError,
    StaleRoundError,
    UnknownClientError,
)
from paramserver.rounds import (
    Aborted,
    Accepted,
    Event,
    IllegalTransitionError,
    ModelStatus,
    Phase,
    Registration,
    RoundMachine,
    Update,
)

# pytest-timeout's default signal method does not end a hang inside a
# hypothesis test: hypothesis catches the timeout as a failure and shrinks it,
# re-running the hanging example with no second alarm. The thread method
# always ends the run (with every thread's stack). The limit stays the global one.
pytestmark = pytest.mark.timeout(method="thread")

VALID_NAMES = ("a", "b", "c", "d", "e", "f.g-h_0", "z" * 64)
INVALID_NAMES = ("", "z" * 65, "bad name", "é", "a/b", "a\x00")
NAMES = VALID_NAMES + INVALID_NAMES
# "ghost" is a valid name that is never registered.
SUBMITTERS = (*VALID_NAMES, "ghost")
DIGESTS = (b"\x01" * 32, b"\x02" * 32)

Snapshot = tuple[Any, ...]


def snapshot(machine: RoundMachine[str]) -> Snapshot:
    """Everything the machine holds, by value."""
    return (machine.clients, machine.total_rounds, machine.capacity, machine.round_timeout,
            machine.min_clients, machine.phase, machine.open_round, machine.published_round,
            machine.opened_at, dict(machine.ready_at), machine.fastest,
            machine.previous_fastest,
            dict(machine.registered),
            set(machine.inactive), machine.cohort, dict(machine.received),
            dict(machine.last_digests), machine.last_cohort_size)


@dataclass
class Model:
    """The barrier as the rounds module docstring describes it, written naively."""

    clients: int  # registrations round 1 waits for
    total_rounds: int
    capacity: int
    round_timeout: float | None
    min_clients: int  # the quorum
    phase: Phase = Phase.WAITING_FOR_CLIENTS
    registered: dict[str, int] = field(default_factory=dict)  # name -> open round then
    inactive: set[str] = field(default_factory=set)  # dropouts until they register again
    open_round: int = 1
    published_round: int = 0
    opened_at: float | None = None
    # Each client may take as long as the round's fastest client did, plus the
    # timeout, from when it could start (the round began, or it registered
    # while the round waited for clients).
    started: dict[str, float] = field(default_factory=dict)
    fastest: float | None = None
    previous_fastest: float | None = None
    cohort: set[str] = field(default_factory=set)
    sent: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # -> (digest, payload)
    # The digests of the last published round: resending one of them (an upload
    # whose acknowledgement was lost) is acknowledged as a duplicate.
    last_digests: dict[str, bytes] = field(default_factory=dict)
    last_cohort_size: int = 0

    @property
    def active(self) -> set[str]:
        return set(self.registered) - self.inactive

    @property
    def deadline(self) -> float | None:
        if self.round_timeout is None or self.phase not in (Phase.WAITING_FOR_CLIENTS,
                                                            Phase.COLLECTING):
            return None
        fastest = self.fastest
        if fastest is None and self.phase is Phase.COLLECTING:
            fastest = self.previous_fastest  # a round nobody has sent for yet
        if fastest is None:
            return None
        members = self.active if self.phase is Phase.WAITING_FOR_CLIENTS else self.cohort
        late = [m for m in members if m not in self.sent] or list(members)
        return max(self.started[m] for m in late) + fastest + self.round_timeout

    def needed_to_open(self) -> int:
        return self.clients if self.open_round == 1 else self.min_clients

    def open(self, now: float) -> None:
        self.phase = Phase.COLLECTING
        self.cohort = self.active
        self.opened_at = now  # updates sent while it waited stay, and so does their clock

    def expected(self) -> int:
        # While the round waits for clients its cohort is unknown: 0, never a guess.
        return 0 if self.phase is Phase.WAITING_FOR_CLIENTS else len(self.cohort)

    def next_round(self, now: float) -> None:
        self.sent = {}
        self.cohort = set()
        self.started = {c: now for c in self.active}
        if self.fastest is not None:
            self.previous_fastest = self.fastest
        self.fastest = None
        self.open_round += 1
        if self.total_rounds and self.open_round > self.total_rounds:
            self.phase = Phase.FINISHED
        elif len(self.active) >= self.min_clients:
            self.open(now)
        else:
            self.phase = Phase.WAITING_FOR_CLIENTS

    def closed_updates(self) -> tuple[Update[str], ...]:
        return tuple(Update(c, self.sent[c][0], self.sent[c][1]) for c in sorted(self.sent))


def is_late_retry(model: Model, client: str, round: int, digest: bytes) -> bool:
    """The identical update again for the round that was just published."""
    return (client in model.registered and round == model.published_round
            and model.last_digests.get(client) == digest)


def expected_submit_error(model: Model, client: str, round: int,
                          digest: bytes) -> type[ParamServerError] | None:
    """The error a submit must raise, or None if it must be acknowledged. A
    base class (RoundError) means any of its subclasses."""
    if client not in model.registered:
        return UnknownClientError
    if model.phase is Phase.FINISHED and round >= model.open_round:
        return RunFinishedError
    if round > model.open_round:
        return FutureRoundError
    if round < model.open_round:
        return StaleRoundError
    # While the round waits for clients, the active ones may send early.
    waiting = model.phase is Phase.WAITING_FOR_CLIENTS
    if client not in (model.active if waiting else model.cohort):
        return NotInCohortError
    if client not in model.sent and model.phase is Phase.AGGREGATING:
        # Closed at its deadline without this client: too late for the round.
        # Any RoundError says so; IllegalTransitionError would blame the
        # transport (and becomes INTERNAL on the wire).
        return RoundError
    if client in model.sent and model.sent[client][0] != digest:
        return ConflictingUpdateError
    return None


def expected_status(model: Model, client: str, round: int) -> ModelStatus | type[ParamServerError]:
    if client not in model.registered:
        return UnknownClientError
    if round == model.published_round:
        return ModelStatus.READY
    if round < model.published_round:
        return StaleRoundError  # only the latest model is kept
    if round < model.open_round:
        return RoundAbortedError  # rounds between published and open were aborted
    if model.phase is Phase.FINISHED:
        return RunFinishedError
    if round > model.open_round:
        return FutureRoundError
    return ModelStatus.PENDING


def assert_raises_exactly(error: BaseException, expected: type[ParamServerError]) -> None:
    if expected in (RoundError, ParamServerError):
        assert isinstance(error, expected), repr(error)
        assert not isinstance(error, IllegalTransitionError), repr(error)
    else:
        assert type(error) is expected, repr(error)


@settings(stateful_step_count=50)
class BarrierMachine(RuleBasedStateMachine):
    """Drives a RoundMachine[str] beside the naive Model and checks they agree."""

    def __init__(self) -> None:
        super().__init__()
        self.machine: RoundMachine[str] | None = None
        self.model: Model | None = None
        self.now = 0.0
        self.closed_rounds: list[int] = []  # in the order they closed
        self.closed_at_deadline = False

    @property
    def m(self) -> RoundMachine[str]:
        assert self.machine is not None
        return self.machine

    @property
    def md(self) -> Model:
        assert self.model is not None
        return self.model

    def clock(self, advance: float = 0.0) -> float:
        """Time moves only in `tick`, so that the shrinker can drop any other step."""
        self.now += advance
        return self.now

    def refused(self, call: Callable[..., object], expected: type[ParamServerError],
                *args: Any) -> BaseException:
        """Calls `call(*args)`, which must raise `expected` and change nothing."""
        before = snapshot(self.m)
        with pytest.raises(ParamServerError) as info:
            call(*args)
        assert_raises_exactly(info.value, expected)
        assert snapshot(self.m) == before, f"{info.value!r} changed the state"
        return info.value

    @initialize(clients=st.integers(1, 3), quorum=st.integers(1, 3),
                total_rounds=st.integers(0, 3), spare=st.integers(0, 4),
                round_timeout=st.sampled_from([None, 3.0, 8.0, 20.0]),
                first=st.lists(st.sampled_from(VALID_NAMES), unique=True, max_size=4))
    def start(self, clients: int, quorum: int, total_rounds: int, spare: int,
              round_timeout: float | None, first: list[str]) -> None:
        quorum = min(quorum, clients)
        capacity = clients + spare
        self.machine = RoundMachine(clients=clients, total_rounds=total_rounds,
                                    capacity=capacity, round_timeout=round_timeout,
                                    min_clients=quorum)
        self.model = Model(clients, total_rounds, capacity, round_timeout, quorum)
        for name in first:  # a head start, checked like any registration
            self.register(name)

    # -- inputs ------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        model, now = self.md, self.clock()
        if name in INVALID_NAMES:
            self.refused(self.m.register, InvalidClientNameError, name, now)
            return
        is_new = name not in model.registered
        if is_new and len(model.registered) >= model.capacity:
            error = self.refused(self.m.register, CapacityError, name, now)
            assert isinstance(error, CapacityError)
            assert error.capacity == model.capacity
            return
        # Known names keep their slot and become active again.
        model.registered.setdefault(name, model.open_round)
        model.inactive.discard(name)
        if model.phase is Phase.WAITING_FOR_CLIENTS:
            model.started.setdefault(name, now)  # joins the round it waits for, now
            # Its early update already in: it takes part from the next round.
            first = model.open_round + (name in model.sent)
            if len(model.active) >= model.needed_to_open():
                model.open(now)
        elif model.phase is Phase.FINISHED:
            first = model.open_round
        elif (model.phase is Phase.COLLECTING and name in model.cohort
              and name not in model.sent):
            first = model.open_round  # the open round still waits for it
        else:
            first = model.open_round + 1  # takes part from the next round
        # Train on the model before `first`; if that round was aborted, on the
        # last published one.
        model_round = first - 1 if first > model.open_round else model.published_round
        assert self.m.register(name, now) == Registration(name, first, is_new, model_round)

    @rule(client=st.sampled_from(SUBMITTERS), delta=st.integers(-2, 2),
          digest=st.sampled_from(DIGESTS))
    def submit(self, client: str, delta: int, digest: bytes) -> None:
        self.check_submit(client, max(0, self.md.open_round + delta), digest)

    @precondition(lambda self: self.model is not None and self.md.phase is Phase.COLLECTING)
    @rule(data=st.data(), digest=st.sampled_from(DIGESTS))
    def submit_pending(self, data: st.DataObject, digest: bytes) -> None:
        """A cohort member that has not sent yet sends for the open round (so
        that rounds close often)."""
        pending = sorted(self.md.cohort - set(self.md.sent))
        self.check_submit(data.draw(st.sampled_from(pending), label="pending client"),
                          self.md.open_round, digest)

    @precondition(lambda self: self.model is not None and bool(self.md.cohort))
    @rule(data=st.data(), digest=st.sampled_from(DIGESTS))
    def submit_from_cohort(self, data: st.DataObject, digest: bytes) -> None:
        """Any cohort member sends for the open round: new, a duplicate, a
        conflict, or too late after the deadline closed the round."""
        client = data.draw(st.sampled_from(sorted(self.md.cohort)), label="cohort client")
        self.check_submit(client, self.md.open_round, digest)

    @precondition(lambda self: self.model is not None and bool(self.md.last_digests))
    @rule(data=st.data(), digest=st.sampled_from(DIGESTS))
    def retry_after_close(self, data: st.DataObject, digest: bytes) -> None:
        """A client of the round last published sends for it again: the same
        update is a duplicate, a different one is stale."""
        client = data.draw(st.sampled_from(sorted(self.md.last_digests)), label="client")
        self.check_submit(client, self.md.published_round, digest)

    def check_submit(self, client: str, round: int, digest: bytes) -> None:
        model, now = self.md, self.clock()
        payload = f"{client}/{round}/{digest.hex()[:2]}/{now}"
        if is_late_retry(model, client, round, digest):
            before = snapshot(self.m)
            n = len(model.last_digests)
            assert self.m.submit(client, round, digest, payload, now) == Accepted(
                round, True, n, model.last_cohort_size)
            assert snapshot(self.m) == before, "a late duplicate changed the state"
            return
        error = expected_submit_error(model, client, round, digest)
        if error is not None:
            raised = self.refused(self.m.submit, error, client, round, digest, payload, now)
            if isinstance(raised, RoundError):
                assert (raised.client_id, raised.round) == (client, round)
                assert raised.open_round == model.open_round
            return
        before = snapshot(self.m)
        accepted = self.m.submit(client, round, digest, payload, now)
        if client in model.sent:  # the same update again: a duplicate
            assert accepted == Accepted(round, True, len(model.sent), model.expected()), accepted
            assert snapshot(self.m) == before, "a duplicate changed the state"
            return
        assert model.phase in (Phase.COLLECTING, Phase.WAITING_FOR_CLIENTS)
        model.sent[client] = (digest, payload)
        took = now - model.started[client]
        model.fastest = took if model.fastest is None else min(model.fastest, took)
        assert accepted.round == round
        assert not accepted.duplicate
        assert (accepted.received, accepted.expected) == (len(model.sent), model.expected())
        if model.phase is Phase.WAITING_FOR_CLIENTS or set(model.sent) != model.cohort:
            assert accepted.closed is None
            return
        # The barrier: exactly the cohort, in sorted client order, first updates.
        model.phase = Phase.AGGREGATING
        assert accepted.closed == model.closed_updates(), "wrong or missing closed round"
        self.closed_rounds.append(round)
        self.closed_at_deadline = False

    @rule(advance=st.sampled_from([0.0, 1.0, 2.5, 5.0, 10.0, 25.0]))
    def tick(self, advance: float) -> None:
        model, now = self.md, self.clock(advance)
        assert self.m.deadline == model.deadline
        before = snapshot(self.m)
        outcome = self.m.tick(now)
        if model.deadline is None or now < model.deadline:
            assert outcome is None
            assert snapshot(self.m) == before, "a tick before the deadline changed the state"
            return
        # The deadline passed: the round (its active clients standing in for
        # the cohort if it never opened) drops the members that sent nothing,
        # then closes with what it has at quorum, else it is aborted. Either
        # way nobody waits on this round any more.
        round = model.open_round
        if model.phase is Phase.WAITING_FOR_CLIENTS:
            model.cohort, model.opened_at = model.active, now
        model.inactive |= model.cohort - set(model.sent)
        if len(model.sent) >= model.min_clients:
            model.phase = Phase.AGGREGATING
            assert outcome == Accepted(round, False, len(model.sent), len(model.cohort),
                                       model.closed_updates())
            self.closed_rounds.append(round)
            self.closed_at_deadline = True
        else:
            assert outcome == Aborted(round, model.closed_updates())
            model.next_round(now)
        assert self.m.phase is Phase.AGGREGATING or self.m.open_round == round + 1

    @precondition(lambda self: self.model is not None and self.md.phase is Phase.AGGREGATING)
    @rule()
    def publish(self) -> None:
        model, now = self.md, self.clock()
        # No round opens before every update of the round before is in (or its
        # deadline closed it at quorum).
        assert set(model.sent) == model.cohort or self.closed_at_deadline
        assert len(model.sent) >= model.min_clients
        assert self.closed_rounds[-1:] == [model.open_round]
        self.m.published(model.open_round, now)
        model.published_round = model.open_round
        model.last_digests = {c: digest for c, (digest, _) in model.sent.items()}
        model.last_cohort_size = len(model.cohort)
        model.next_round(now)

    @precondition(lambda self: self.model is not None and self.md.phase is Phase.AGGREGATING)
    @rule()
    def abort_aggregation(self) -> None:
        """Secure aggregation lost too many clients: the round is aborted, the
        model stays, the next round begins (as after a deadline abort)."""
        model, now = self.md, self.clock()
        aborted = self.m.aggregation_aborted(model.open_round, now)
        assert aborted.round == model.open_round
        assert {u.client_id for u in aborted.discarded} == set(model.sent)
        model.next_round(now)

    @precondition(lambda self: self.model is not None and self.md.phase is Phase.COLLECTING)
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        """Secure aggregation left some cohort members out of its key
        exchange: they leave the cohort as dropouts; the round closes if the
        rest have all sent and are a quorum."""
        model, now = self.md, self.clock()
        leaving = data.draw(st.sets(st.sampled_from(sorted(model.cohort | {"ghost"}))),
                            label="leaving")
        outcome = self.m.withdraw(leaving, model.open_round, now)
        gone = (model.cohort & leaving) - set(model.sent)
        model.cohort -= gone
        model.inactive |= gone
        if gone and len(model.cohort) < model.min_clients:  # can never reach its quorum
            assert isinstance(outcome, Aborted)
            assert {u.client_id for u in outcome.discarded} == set(model.sent)
            model.next_round(now)
        elif gone and set(model.sent) >= model.cohort:
            model.phase = Phase.AGGREGATING
            assert isinstance(outcome, Accepted)
            assert outcome.closed == model.closed_updates()
            self.closed_rounds.append(model.open_round)
            self.closed_at_deadline = False
        else:
            assert outcome is None

    @rule(delta=st.integers(-2, 2))
    def publish_out_of_turn(self, delta: int) -> None:
        """Publishing any round but a closed one is a transport bug: refused."""
        if self.md.phase is Phase.AGGREGATING and delta == 0:
            return
        self.refused(self.m.published, IllegalTransitionError,
                     self.md.open_round + delta, self.clock())

    @rule(client=st.sampled_from(SUBMITTERS), delta=st.integers(-3, 2))
    def model_status(self, client: str, delta: int) -> None:
        round = max(0, self.md.open_round + delta)
        expected = expected_status(self.md, client, round)
        if isinstance(expected, ModelStatus):
            before = snapshot(self.m)
            assert self.m.model_status(client, round) is expected
            assert snapshot(self.m) == before
        else:
            self.refused(self.m.model_status, expected, client, round)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if self.machine is None:
            return
        m, model = self.m, self.md
        assert m.phase is model.phase
        assert m.open_round == model.open_round
        assert m.published_round == model.published_round
        assert m.opened_at == model.opened_at
        assert m.fastest == model.fastest
        assert m.previous_fastest == model.previous_fastest
        assert m.deadline == model.deadline
        assert m.registered == model.registered
        assert m.inactive == model.inactive
        assert m.active == frozenset(model.active)
        assert m.last_digests == model.last_digests
        assert m.last_cohort_size == model.last_cohort_size
        assert m.cohort == frozenset(model.cohort)
        assert {c: (u.digest, u.payload) for c, u in m.received.items()} == model.sent
        assert all(c == u.client_id for c, u in m.received.items())
        assert m.deadline == model.deadline

    @invariant()
    def structural(self) -> None:
        if self.machine is None:
            return
        m = self.m
        assert m.published_round <= m.open_round - 1
        assert len(m.registered) <= m.capacity
        assert m.inactive <= m.registered.keys()
        assert m.cohort <= m.registered.keys()
        if m.phase is not Phase.WAITING_FOR_CLIENTS:
            assert m.received.keys() <= m.cohort
        if m.phase is Phase.WAITING_FOR_CLIENTS:
            needed = m.clients if m.open_round == 1 else m.min_clients
            assert len(m.active) < needed
            assert not m.cohort
            assert m.received.keys() <= m.active  # early updates of its cohort-to-be
        elif m.phase is Phase.COLLECTING:
            assert m.received.keys() < m.cohort <= m.active
        elif m.phase is Phase.AGGREGATING:
            assert len(m.received) >= m.min_clients
        else:
            assert m.total_rounds
            assert m.open_round == m.total_rounds + 1
            assert not m.cohort
            assert not m.received
        # Rounds close in order, at most once each.
        assert self.closed_rounds == sorted(set(self.closed_rounds))

    @invariant()
    def nobody_waits_without_a_deadline(self) -> None:
        """With a round timeout, every round that holds an update (its sender
        waits at the barrier), open or still waiting for clients, has a
        deadline: a dead client holds up one round at most."""
        if self.machine is None or self.machine.round_timeout is None:
            return
        m, timeout = self.machine, self.machine.round_timeout
        if m.received and m.phase in (Phase.WAITING_FOR_CLIENTS, Phase.COLLECTING):
            deadline = m.deadline
            assert deadline is not None, f"round {m.open_round} waits with no clock"
            # No later than T after the last client could start plus the
            # time the fastest took: never for ever.
            assert m.fastest is not None
            assert deadline <= self.now + m.fastest + timeout


# Shrinking a failing run of the machine takes a minute or more (hypothesis
# stops shrinking after 300 s), longer than the global timeout: a real failure
# must be reported, not killed.
TestBarrier = pytest.mark.timeout(420, method="thread")(BarrierMachine.TestCase)


@given(min_clients=st.integers(2, 4), data=st.data())
def test_a_dropout_is_told_its_round_closed_at_the_deadline(min_clients: int,
                                                            data: st.DataObject) -> None:
    """A round closed at its deadline with a quorum of updates: a cohort member
    that had not sent is refused with a RoundError (its round is over), not with
    IllegalTransitionError, which tells the transport it has a bug."""
    quorum = data.draw(st.integers(1, min_clients - 1), label="quorum")
    machine: RoundMachine[str] = RoundMachine(clients=min_clients, min_clients=quorum,
                                              round_timeout=TIMEOUT)
    names = [f"c{i}" for i in range(min_clients)]
    for name in names:
        machine.register(name, 0.0)
    order = data.draw(st.permutations(names), label="order")
    cut = data.draw(st.integers(quorum, min_clients - 1), label="senders")
    senders, dropouts = order[:cut], order[cut:]
    for name in senders:
        machine.submit(name, 1, b"\x00", name, 0.0)
    outcome = machine.tick(TIMEOUT)
    assert isinstance(outcome, Accepted)
    assert outcome.closed is not None
    assert [u.client_id for u in outcome.closed] == sorted(senders)
    assert machine.phase is Phase.AGGREGATING
    assert machine.inactive == set(dropouts)
    late = data.draw(st.sampled_from(dropouts), label="late client")
    before = snapshot(machine)
    _, error = attempt(partial(machine.submit, late, 1, b"\x01", "late", TIMEOUT))
    assert snapshot(machine) == before
    assert isinstance(error, RoundError), f"late update for a closed round: {error!r}"


# -- a whole run ---------------------------------------------------------------------


@given(min_clients=st.integers(1, 4), total_rounds=st.integers(1, 4), late=st.integers(0, 2),
       data=st.data())
def test_a_run_finishes_after_total_rounds(min_clients: int, total_rounds: int, late: int,
                                           data: st.DataObject) -> None:
    machine: RoundMachine[str] = RoundMachine(clients=min_clients,
                                              total_rounds=total_rounds)
    names = [f"c{i}" for i in range(min_clients + late)]
    for i, name in enumerate(names[:min_clients]):
        assert machine.register(name, 0.0).first_round == 1
        expected = Phase.COLLECTING if i + 1 == min_clients else Phase.WAITING_FOR_CLIENTS
        assert machine.phase is expected
    for round in range(1, total_rounds + 1):
        if round == 1:  # late joiners take part from round 2
            for name in names[min_clients:]:
                assert machine.register(name, 0.0).first_round == 2
        cohort = names if round > 1 else names[:min_clients]
        assert machine.cohort == frozenset(cohort)
        order = data.draw(st.permutations(cohort), label=f"arrivals in round {round}")
        for i, name in enumerate(order):
            accepted = machine.submit(name, round, b"d", f"{name}@{round}", 0.0)
            assert (accepted.closed is None) == (i + 1 < len(order))
        assert accepted.closed is not None
        assert [u.client_id for u in accepted.closed] == sorted(cohort)
        assert machine.model_status(names[0], round) is ModelStatus.PENDING
        machine.published(round, float(round))
        assert machine.model_status(names[0], round) is ModelStatus.READY
    assert machine.phase is Phase.FINISHED
    assert machine.open_round == total_rounds + 1
    with pytest.raises(RunFinishedError):
        machine.submit(names[0], total_rounds + 1, b"d", "late", 9.0)
    with pytest.raises(RunFinishedError):
        machine.model_status(names[0], total_rounds + 1)
    registration = machine.register("newcomer", 9.0)
    assert (registration.first_round, registration.is_new) == (total_rounds + 1, True)
    assert machine.phase is Phase.FINISHED


# -- every (phase, input) pair -------------------------------------------------------

# The transitions the module docstring describes, written out independently:
# (phase, event value) -> the phases the machine may be in afterwards when the
# input changes the state. An absent pair changes nothing (it is refused, or is
# a no-op such as a known name registering again or a tick before a deadline).
TRANSITIONS: dict[tuple[Phase, str], frozenset[Phase]] = {
    (Phase.WAITING_FOR_CLIENTS, "register"):
        frozenset({Phase.WAITING_FOR_CLIENTS, Phase.COLLECTING}),
    (Phase.COLLECTING, "register"): frozenset({Phase.COLLECTING}),
    (Phase.AGGREGATING, "register"): frozenset({Phase.AGGREGATING}),
    (Phase.FINISHED, "register"): frozenset({Phase.FINISHED}),
    (Phase.AGGREGATING, "publish"):
        frozenset({Phase.COLLECTING, Phase.WAITING_FOR_CLIENTS, Phase.FINISHED}),
    # Members that can no longer send leave: the round may close.
    # (Below quorum, the round is aborted and the next one begins.)
    (Phase.COLLECTING, "withdraw"):
        frozenset({Phase.COLLECTING, Phase.AGGREGATING, Phase.WAITING_FOR_CLIENTS,
                   Phase.FINISHED}),
    # An aggregation that cannot finish: the round is aborted, the next begins.
    (Phase.AGGREGATING, "abort"):
        frozenset({Phase.COLLECTING, Phase.WAITING_FOR_CLIENTS, Phase.FINISHED}),
    (Phase.COLLECTING, "deadline"):
        frozenset({Phase.AGGREGATING, Phase.COLLECTING, Phase.WAITING_FOR_CLIENTS,
                   Phase.FINISHED}),
    # A round that never opened, at the deadline its early updates started.
    (Phase.WAITING_FOR_CLIENTS, "deadline"):
        frozenset({Phase.AGGREGATING, Phase.COLLECTING, Phase.WAITING_FOR_CLIENTS,
                   Phase.FINISHED}),
    (Phase.COLLECTING, "submit"): frozenset({Phase.COLLECTING, Phase.AGGREGATING}),
    # An early update while the round waits for clients; the barrier waits too.
    (Phase.WAITING_FOR_CLIENTS, "submit"): frozenset({Phase.WAITING_FOR_CLIENTS}),
}
TIMEOUT = 10.0


def drive_to(phase: Phase, data: st.DataObject) -> RoundMachine[str]:
    """A machine brought to `phase` through its public inputs only (rounds
    complete, or close or abort at their deadline), sometimes with early
    updates in a round that waits for clients."""
    clients = data.draw(st.integers(1, 3), label="clients")
    quorum = data.draw(st.integers(1, clients), label="quorum")
    rounds_done = data.draw(st.integers(0, 2), label="rounds done")
    total = max(1, rounds_done) if phase is Phase.FINISHED else 0
    machine: RoundMachine[str] = RoundMachine(
        clients=clients, total_rounds=total, capacity=clients + 2,
        round_timeout=data.draw(st.sampled_from([None, TIMEOUT]), label="timeout"),
        min_clients=quorum)
    now = 0.0
    if phase is Phase.WAITING_FOR_CLIENTS and (
            quorum < 2 or machine.round_timeout is None or data.draw(st.booleans())):
        for i in range(data.draw(st.integers(0, clients - 1), label="registered")):
            machine.register(f"c{i}", now)
        for name in sorted(machine.active)[:data.draw(st.integers(0, 2), label="early")]:
            machine.submit(name, 1, b"\x00", "x", now)
        assert machine.phase is phase
        return machine
    for i in range(clients):
        machine.register(f"c{i}", now)
    if phase is Phase.WAITING_FOR_CLIENTS:  # one update, below quorum: an abort
        assert machine.round_timeout is not None
        machine.submit("c0", 1, b"\x00", "x", now)
        assert isinstance(machine.tick(now + TIMEOUT), Aborted)
        assert machine.phase is phase
        return machine
    for round in range(1, (total or rounds_done) + 1):
        for name in sorted(machine.cohort):
            machine.submit(name, round, b"\x00", "x", now)
        now += 1.0
        machine.published(round, now)
    cohort = sorted(machine.cohort)
    if phase is Phase.COLLECTING:
        for name in cohort[:data.draw(st.integers(0, len(cohort) - 1), label="sent")]:
            machine.submit(name, machine.open_round, b"\x00", "x", now)
    elif phase is Phase.AGGREGATING:
        if machine.round_timeout is not None and data.draw(st.booleans(), label="by deadline"):
            for name in cohort[:data.draw(st.integers(quorum, len(cohort)), label="sent")]:
                machine.submit(name, machine.open_round, b"\x00", "x", now)
            machine.tick(now + TIMEOUT)
        else:
            for name in cohort:
                machine.submit(name, machine.open_round, b"\x00", "x", now)
    assert machine.phase is phase
    return machine


def attempt(call: Callable[[], object]) -> tuple[object, ParamServerError | None]:
    """The call's result, or the error of ours it raised (anything else propagates)."""
    try:
        return call(), None
    except ParamServerError as error:
        return None, error


def check_outcome(machine: RoundMachine[str], phase: Phase, what: str, before: Snapshot,
                  open_round: int, result: object, error: ParamServerError | None) -> None:
    if error is not None:
        assert snapshot(machine) == before, f"{error!r} changed the state"
        if what in ("publish", "deadline", "abort", "withdraw"):
            assert isinstance(error, IllegalTransitionError), repr(error)
        elif what == "register":
            assert isinstance(error, InvalidClientNameError | CapacityError), repr(error)
        else:
            assert isinstance(error, UnknownClientError | RoundError | ConflictingUpdateError), (
                f"submit while {phase}: {error!r}")
        return
    if snapshot(machine) == before:  # a no-op: a known name, a duplicate, an early tick
        assert what not in ("publish", "abort")
        if isinstance(result, Accepted):
            assert result.duplicate
        return
    allowed = TRANSITIONS.get((phase, what))
    assert allowed is not None, f"{what} changed the state while {phase}"
    assert machine.phase in allowed, f"{phase} --{what}--> {machine.phase}"
    if what == "publish":
        assert machine.published_round == open_round
    if what == "abort":
        assert isinstance(result, Aborted)
        assert machine.published_round == before[7]  # the snapshot's published_round
    if what == "withdraw":  # aborted below quorum: the next round; else the same
        assert machine.open_round == open_round + isinstance(result, Aborted)
    elif what in ("publish", "deadline", "abort") and machine.phase is not Phase.AGGREGATING:
        assert machine.open_round == open_round + 1
    else:
        assert machine.open_round == open_round


def _value(member: Phase | Event) -> str:
    return str(member.value)


@pytest.mark.parametrize("event", list(Event), ids=_value)
@pytest.mark.parametrize("phase", list(Phase), ids=_value)
@given(data=st.data())
def test_every_phase_event_pair(phase: Phase, event: Event, data: st.DataObject) -> None:
    """Every event in every phase either moves the machine as the table says,
    changes nothing, or is refused with one of our errors, changing nothing."""
    machine = drive_to(phase, data)
    before, open_round = snapshot(machine), machine.open_round
    known = sorted(machine.registered)
    call: Callable[[], object]
    if event.value == "register":
        name = data.draw(st.sampled_from([*known, *NAMES, "new"]), label="name")
        call = partial(machine.register, name, 100.0)
    elif event.value == "publish":
        round = data.draw(st.integers(max(0, open_round - 1), open_round + 1), label="round")
        call = partial(machine.published, round, 100.0)
    elif event.value == "deadline":
        deadline = machine.deadline
        late = data.draw(st.floats(0, 2 * TIMEOUT), label="after opening")
        now = (machine.opened_at or 0.0) + late if deadline is None else deadline + late - TIMEOUT
        call = partial(machine.tick, now)
    elif event.value == "withdraw":
        round = data.draw(st.integers(max(0, open_round - 1), open_round + 1), label="round")
        leaving = data.draw(st.sets(st.sampled_from([*known, "ghost"])), label="leaving")
        call = partial(machine.withdraw, leaving, round, 100.0)
    elif event.value == "abort":
        round = data.draw(st.integers(max(0, open_round - 1), open_round + 1), label="round")
        call = partial(machine.aggregation_aborted, round, 100.0)
    else:
        raise AssertionError(f"no driver for {event}: extend this test")
    result, error = attempt(call)
    check_outcome(machine, phase, event.value, before, open_round, result, error)


@pytest.mark.parametrize("phase", list(Phase), ids=_value)
@given(data=st.data())
def test_every_phase_submit(phase: Phase, data: st.DataObject) -> None:
    """Submissions (decided by round numbers rather than the transition table)
    in every phase: accepted only while collecting, else a duplicate
    acknowledgement or a refusal naming the client's problem, never a
    transport-bug IllegalTransitionError."""
    machine = drive_to(phase, data)
    before, open_round = snapshot(machine), machine.open_round
    anyone = st.sampled_from([*sorted(machine.registered), "ghost"])
    client = data.draw(st.one_of(st.sampled_from(sorted(machine.cohort)), anyone)
                       if machine.cohort else anyone, label="client")
    round = data.draw(st.one_of(st.just(open_round),
                                st.integers(max(0, open_round - 2), open_round + 2)),
                      label="round")
    digest = data.draw(st.sampled_from([b"\x00", b"\x01"]), label="digest")
    result, error = attempt(partial(machine.submit, client, round, digest, "y", 50.0))
    check_outcome(machine, phase, "submit", before, open_round, result, error)
