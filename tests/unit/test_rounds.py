import pytest

from paramserver.errors import (
    CapacityError,
    ConflictingUpdateError,
    FutureRoundError,
    InvalidClientNameError,
    NotInCohortError,
    RunFinishedError,
    StaleRoundError,
    UnknownClientError,
)
from paramserver.rounds import (
    Aborted,
    Accepted,
    Assignment,
    IllegalTransitionError,
    ModelStatus,
    Phase,
    Role,
    RoundMachine,
    RoundTiming,
    Update,
)


def started(n: int = 2, rounds: int = 0) -> RoundMachine[str]:
    machine: RoundMachine[str] = RoundMachine(clients=n, total_rounds=rounds)
    for i in range(n):
        machine.register(f"c{i}", now=0.0)
    return machine


def test_round_one_opens_when_its_clients_registered() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=2)
    assert machine.register("a", 0.0).first_round == 1
    phases = [machine.phase]
    machine.register("b", 5.0)
    phases.append(machine.phase)
    assert phases == [Phase.WAITING_FOR_CLIENTS, Phase.COLLECTING]
    assert machine.cohort == {"a", "b"}
    assert machine.opened_at == 5.0


def test_registration_is_idempotent() -> None:
    machine = started()
    again = machine.register("c0", 1.0)
    assert (again.client_id, again.first_round, again.is_new) == ("c0", 1, False)
    assert len(machine.registered) == 2


def test_barrier_closes_with_updates_in_canonical_order() -> None:
    machine = started(3)
    assert machine.submit("c2", 1, b"x", "p2", 0.0).closed is None
    assert machine.submit("c0", 1, b"y", "p0", 0.0).closed is None
    accepted = machine.submit("c1", 1, b"z", "p1", 0.0)
    assert accepted.closed is not None
    assert [u.client_id for u in accepted.closed] == ["c0", "c1", "c2"]
    assert [u.payload for u in accepted.closed] == ["p0", "p1", "p2"]
    assert machine.phase is Phase.AGGREGATING
    assert machine.model_status("c0", 1) is ModelStatus.PENDING
    machine.published(1, now=2.0)
    assert (machine.phase, machine.open_round, machine.published_round) == (
        Phase.COLLECTING, 2, 1)
    assert machine.model_status("c0", 1) is ModelStatus.READY


def test_duplicate_is_acknowledged_and_counted_once() -> None:
    machine = started()
    machine.submit("c0", 1, b"d", "p", 0.0)
    again = machine.submit("c0", 1, b"d", "other payload", 0.0)
    assert again.duplicate
    assert again.received == 1
    assert machine.received["c0"].payload == "p"


def test_different_second_update_is_refused_and_first_kept() -> None:
    machine = started()
    machine.submit("c0", 1, b"d", "p", 0.0)
    with pytest.raises(ConflictingUpdateError):
        machine.submit("c0", 1, b"e", "q", 0.0)
    assert machine.received["c0"].payload == "p"


@pytest.mark.parametrize(
    ("client", "round", "error"),
    [("nobody", 1, UnknownClientError), ("c0", 0, StaleRoundError),
     ("c0", 2, FutureRoundError)],
)
def test_refused_submissions_change_nothing(client: str, round: int, error: type) -> None:
    machine = started()
    before = (machine.phase, machine.open_round, dict(machine.received))
    with pytest.raises(error):
        machine.submit(client, round, b"d", "p", 0.0)
    assert (machine.phase, machine.open_round, dict(machine.received)) == before


def test_late_joiner_takes_part_from_next_round() -> None:
    machine = started()
    reg = machine.register("late", 1.0)
    assert reg.first_round == 2
    with pytest.raises(NotInCohortError):
        machine.submit("late", 1, b"d", "p", 0.0)
    machine.submit("c0", 1, b"a", "p", 0.0)
    machine.submit("c1", 1, b"b", "p", 0.0)
    machine.published(1, 2.0)
    assert machine.cohort == {"c0", "c1", "late"}


def test_run_finishes_after_total_rounds() -> None:
    machine = started(1, rounds=1)
    machine.submit("c0", 1, b"a", "p", 0.0)
    machine.published(1, 1.0)
    assert machine.phase is Phase.FINISHED
    with pytest.raises(RunFinishedError):
        machine.submit("c0", 2, b"a", "p", 0.0)
    with pytest.raises(RunFinishedError):
        machine.model_status("c0", 2)
    assert machine.model_status("c0", 1) is ModelStatus.READY


def test_publish_outside_aggregation_is_illegal() -> None:
    machine = started()
    with pytest.raises(IllegalTransitionError):
        machine.published(1, 0.0)


def test_capacity_and_names() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=1, capacity=1)
    machine.register("a", 0.0)
    with pytest.raises(CapacityError):
        machine.register("b", 0.0)
    for bad in ["", "x" * 65, "has space", "slash/no"]:
        with pytest.raises(InvalidClientNameError):
            machine.register(bad, 0.0)


def test_model_status_errors() -> None:
    machine = started()
    with pytest.raises(FutureRoundError):
        machine.model_status("c0", 2)
    with pytest.raises(UnknownClientError):
        machine.model_status("ghost", 0)
    machine.submit("c0", 1, b"a", "p", 0.0)
    machine.submit("c1", 1, b"b", "p", 0.0)
    machine.published(1, 1.0)
    with pytest.raises(StaleRoundError):
        machine.model_status("c0", 0)


# -- the deadline runs from a round's first update ---------------------------------


def timed(n: int = 3, quorum: int = 2, rounds: int = 0) -> RoundMachine[str]:
    machine: RoundMachine[str] = RoundMachine(clients=n, min_clients=quorum,
                                              total_rounds=rounds, round_timeout=5.0)
    for i in range(n):
        machine.register(f"c{i}", now=0.0)
    return machine


def test_no_deadline_until_the_first_update_then_from_it() -> None:
    """A cold first round (clients training for long) is not cut short: the
    clock starts at the first update, not at the opening."""
    machine = timed()
    assert machine.deadline is None
    assert machine.tick(1000.0) is None  # nobody has sent: nobody is held up
    machine.submit("c0", 1, b"a", "p", 1000.0)
    assert machine.deadline == 1005.0
    assert machine.tick(1004.9) is None
    machine.submit("c1", 1, b"b", "p", 1004.0)
    outcome = machine.tick(1005.0)
    assert isinstance(outcome, Accepted)
    assert outcome.closed is not None
    assert [u.client_id for u in outcome.closed] == ["c0", "c1"]
    assert machine.inactive == {"c2"}


def test_a_round_waiting_for_clients_has_a_deadline_too() -> None:
    """After an abort leaves fewer active clients than the quorum, the next
    round waits for clients; an early update starts its clock, so it is
    aborted at its deadline instead of waiting for ever."""
    machine = timed(n=2, quorum=2)
    machine.submit("c0", 1, b"a", "p", 0.0)
    assert isinstance(machine.tick(5.0), Aborted)  # c1 dropped out
    assert machine.phase is Phase.WAITING_FOR_CLIENTS
    assert machine.active == {"c0"}
    assert machine.register("c0", 6.0).first_round == 2
    early = machine.submit("c0", 2, b"b", "p", 7.0)
    assert (early.received, early.expected) == (1, 0)  # the cohort is not known yet
    assert machine.deadline == 12.0
    aborted = machine.tick(12.0)
    assert isinstance(aborted, Aborted)
    assert aborted.round == 2
    assert machine.open_round == 3


def test_a_waiting_round_closes_at_its_deadline_with_a_quorum() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=3, min_clients=1, round_timeout=5.0)
    machine.register("a", 0.0)
    machine.register("b", 0.0)
    machine.submit("a", 1, b"a", "p", 1.0)
    outcome = machine.tick(6.0)
    assert isinstance(outcome, Accepted)
    assert (outcome.received, outcome.expected) == (1, 2)
    assert machine.phase is Phase.AGGREGATING
    assert machine.inactive == {"b"}


def test_an_early_ack_never_states_a_cohort_that_turns_out_false() -> None:
    """1 of 3 registered sends early: the ack cannot know the cohort (3, once
    round 1 opens), so it says 0; once open, acks say the real cohort."""
    machine: RoundMachine[str] = RoundMachine(clients=3)
    machine.register("a", 0.0)
    early = machine.submit("a", 1, b"a", "p", 0.0)
    assert early.expected == 0
    assert machine.submit("a", 1, b"a", "p", 0.0).expected == 0  # its duplicate too
    machine.register("b", 0.0)
    machine.register("c", 0.0)
    assert machine.submit("b", 1, b"b", "p", 0.0).expected == 3


def test_the_retry_of_a_lost_ack_after_the_close_states_the_cohort() -> None:
    machine = timed(n=3, quorum=1)
    machine.submit("c0", 1, b"a", "p", 0.0)
    machine.tick(5.0)  # closes with c0 alone
    machine.published(1, 6.0)
    again = machine.submit("c0", 1, b"a", "p", 7.0)
    assert (again.duplicate, again.received, again.expected) == (True, 1, 3)


def test_a_late_registrant_gets_as_long_as_the_fastest_client_took() -> None:
    """Round 1 with a cold start: a registered at 0 and needed 10 s for its
    first update; b registers at 20 and gets the same 10 s plus the timeout,
    so a timeout sized for the spread of the steady state (5 s) works from
    round 1."""
    machine: RoundMachine[str] = RoundMachine(clients=2, min_clients=2, round_timeout=5.0)
    machine.register("a", 0.0)
    machine.submit("a", 1, b"a", "p", 10.0)
    assert machine.deadline == 15.0  # nobody else has registered yet
    machine.register("b", 20.0)
    assert machine.phase is Phase.COLLECTING
    assert machine.deadline == 35.0
    assert machine.tick(34.0) is None
    accepted = machine.submit("b", 1, b"b", "p", 33.0)
    assert accepted.closed is not None  # b made it: no dropout, no abort


def test_in_later_rounds_the_deadline_is_the_first_update_plus_the_timeout() -> None:
    machine = timed(n=2, quorum=1)
    machine.submit("c0", 1, b"a", "p", 1.0)
    machine.submit("c1", 1, b"b", "p", 2.0)
    machine.published(1, 3.0)  # round 2 begins: everyone starts at 3
    machine.submit("c1", 2, b"b", "p", 7.0)
    assert machine.deadline == 12.0


def test_a_round_nobody_sends_for_ends_after_the_last_rounds_fastest_time() -> None:
    """The whole cohort of round 2 died: a client that joined during it would
    wait for ever. The last round's fastest time stands in for its own."""
    machine = timed(n=2, quorum=1)
    machine.submit("c0", 1, b"a", "p", 2.0)  # fastest 2
    machine.submit("c1", 1, b"b", "p", 3.0)
    machine.published(1, 10.0)  # round 2 begins; nobody will send
    machine.register("late", 11.0)
    assert machine.deadline == 10.0 + 2.0 + 5.0
    aborted = machine.tick(17.0)
    assert isinstance(aborted, Aborted)
    assert machine.inactive == {"c0", "c1"}
    assert machine.open_round == 3


def test_a_faster_update_brings_the_deadline_forward() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=3, min_clients=1, round_timeout=5.0)
    machine.register("a", 0.0)
    machine.submit("a", 1, b"a", "p", 20.0)
    machine.register("b", 22.0)
    assert machine.deadline == 22.0 + 20.0 + 5.0
    machine.submit("b", 1, b"b", "p", 23.0)  # took 1 s
    assert machine.deadline == 22.0 + 1.0 + 5.0


def test_a_client_whose_early_update_is_in_is_sent_on_to_the_next_round() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=3)
    machine.register("a", 0.0)
    machine.submit("a", 1, b"a", "p", 1.0)
    again = machine.register("a", 2.0)  # e.g. after a crash of the client
    assert (again.first_round, again.model_round) == (2, 1)


def test_a_restart_keeps_the_fastest_time_it_recorded() -> None:
    machine: RoundMachine[str] = RoundMachine(clients=2, min_clients=1, round_timeout=5.0)
    machine.restore({"a": 1, "b": 1}, 0, 1, frozenset({"a", "b"}),
                    [Update("a", b"a", "p")], 100.0, timing=RoundTiming(fastest=20.0))
    assert machine.deadline == 100.0 + 20.0 + 5.0


# -- sampling and assignments -----------------------------------------------------------------


def sampled(n: int = 4, size: int = 2, quorum: int = 1) -> RoundMachine[str]:
    def first_in_order(round: int, available: frozenset[str]) -> frozenset[str]:
        ordered = sorted(available)  # rotate with the round, to see it change
        return frozenset((ordered * 2)[round % len(ordered):][:size])

    machine: RoundMachine[str] = RoundMachine(clients=n, min_clients=quorum,
                                              sample=first_in_order)
    for i in range(n):
        machine.register(f"c{i}", 0.0)
    return machine


def test_a_sampled_round_waits_for_its_cohort_only() -> None:
    machine = sampled()
    assert machine.cohort == {"c1", "c2"}
    machine.submit("c1", 1, b"a", "p", 1.0)
    assert machine.submit("c2", 1, b"b", "p", 1.0).closed is not None
    machine.published(1, 2.0)
    assert machine.cohort == {"c2", "c3"}


def test_the_clients_not_drawn_are_told_to_wait_not_refused() -> None:
    machine = sampled()
    assert machine.assignment("c1", 0) == Assignment(Role.TRAIN, 1, 0)
    assert machine.assignment("c0", 0) == Assignment(Role.WAIT, 1, 0)
    with pytest.raises(NotInCohortError):  # an update anyway is refused
        machine.submit("c0", 1, b"x", "p", 1.0)
    machine.submit("c1", 1, b"a", "p", 1.0)
    assert machine.assignment("c1", 0) == Assignment(Role.WAIT, 1, 0)  # sent: wait for it
    assert machine.assignment("c1", 1) is None  # round 2 has not opened
    machine.submit("c2", 1, b"b", "p", 1.0)
    machine.published(1, 2.0)
    assert machine.assignment("c0", 1) == Assignment(Role.WAIT, 2, 1)
    assert machine.assignment("c3", 1) == Assignment(Role.TRAIN, 2, 1)


def test_nobody_sends_early_for_a_sampled_round() -> None:
    def everyone(round: int, available: frozenset[str]) -> frozenset[str]:
        return available

    machine: RoundMachine[str] = RoundMachine(clients=2, sample=everyone)
    machine.register("a", 0.0)
    with pytest.raises(FutureRoundError):
        machine.submit("a", 1, b"a", "p", 0.0)
    assert machine.assignment("a", 0) is None  # the cohort is not known yet


def test_a_finished_run_says_so_to_every_asker() -> None:
    machine = started(1, rounds=1)
    machine.submit("c0", 1, b"a", "p", 0.0)
    machine.published(1, 1.0)
    assert machine.assignment("c0", 0) == Assignment(Role.FINISHED, 1, 1)
