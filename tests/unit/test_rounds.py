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
from paramserver.rounds import IllegalTransitionError, ModelStatus, Phase, RoundMachine


def started(n: int = 2, rounds: int = 0) -> RoundMachine[str]:
    machine: RoundMachine[str] = RoundMachine(min_clients=n, total_rounds=rounds)
    for i in range(n):
        machine.register(f"c{i}", now=0.0)
    return machine


def test_round_one_opens_when_min_clients_registered() -> None:
    machine: RoundMachine[str] = RoundMachine(min_clients=2)
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
    assert len(machine.clients) == 2


def test_barrier_closes_with_updates_in_canonical_order() -> None:
    machine = started(3)
    assert machine.submit("c2", 1, b"x", "p2").closed is None
    assert machine.submit("c0", 1, b"y", "p0").closed is None
    accepted = machine.submit("c1", 1, b"z", "p1")
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
    machine.submit("c0", 1, b"d", "p")
    again = machine.submit("c0", 1, b"d", "other payload")
    assert again.duplicate
    assert again.received == 1
    assert machine.received["c0"].payload == "p"


def test_different_second_update_is_refused_and_first_kept() -> None:
    machine = started()
    machine.submit("c0", 1, b"d", "p")
    with pytest.raises(ConflictingUpdateError):
        machine.submit("c0", 1, b"e", "q")
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
        machine.submit(client, round, b"d", "p")
    assert (machine.phase, machine.open_round, dict(machine.received)) == before


def test_late_joiner_takes_part_from_next_round() -> None:
    machine = started()
    reg = machine.register("late", 1.0)
    assert reg.first_round == 2
    with pytest.raises(NotInCohortError):
        machine.submit("late", 1, b"d", "p")
    machine.submit("c0", 1, b"a", "p")
    machine.submit("c1", 1, b"b", "p")
    machine.published(1, 2.0)
    assert machine.cohort == {"c0", "c1", "late"}


def test_run_finishes_after_total_rounds() -> None:
    machine = started(1, rounds=1)
    machine.submit("c0", 1, b"a", "p")
    machine.published(1, 1.0)
    assert machine.phase is Phase.FINISHED
    with pytest.raises(RunFinishedError):
        machine.submit("c0", 2, b"a", "p")
    with pytest.raises(RunFinishedError):
        machine.model_status("c0", 2)
    assert machine.model_status("c0", 1) is ModelStatus.READY


def test_publish_outside_aggregation_is_illegal() -> None:
    machine = started()
    with pytest.raises(IllegalTransitionError):
        machine.published(1, 0.0)


def test_capacity_and_names() -> None:
    machine: RoundMachine[str] = RoundMachine(min_clients=1, capacity=1)
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
    machine.submit("c0", 1, b"a", "p")
    machine.submit("c1", 1, b"b", "p")
    machine.published(1, 1.0)
    with pytest.raises(StaleRoundError):
        machine.model_status("c0", 0)
