"""The coordinator driven directly: deadlines, aborts, resume after a crash,
shutdown. Real threads and files, no gRPC."""

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from paramserver import codec, errors, spool
from paramserver.coordinator import Coordinator, GlobalModel, ServerConfig

MODEL = {"w": torch.zeros(5)}


def update(client: str, round: int, value: float) -> tuple[codec.UpdateHeader, list[bytes]]:
    sd = {"w": torch.full((5,), value)}
    header = codec.UpdateHeader(client, round, 10, codec.spec_of(sd),
                                codec.state_dict_digest(sd))
    return header, [b"".join(codec.payload_views(sd))]


def send(coordinator: Coordinator, client: str, round: int, value: float) -> None:
    header, chunks = update(client, round, value)
    coordinator.submit(header, chunks)


def assert_still_counted(coordinator: Coordinator, client: str, round: int, value: float,
                         why: str) -> None:
    """The update was acknowledged earlier: sending it again is a duplicate."""
    ack = coordinator.check_submit(update(client, round, value)[0])
    assert ack is not None, why
    assert ack.duplicate


def wait(coordinator: Coordinator, client: str, round: int) -> GlobalModel:
    deadline = time.monotonic() + 10
    model = coordinator.wait_for_model(client, round, lambda: deadline - time.monotonic())
    assert model is not None, f"round {round} did not close"
    return model


Make = Callable[..., Coordinator]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[Coordinator] = []

    def factory(**changes: Any) -> Coordinator:
        base = ServerConfig(min_clients=2, state_dir=tmp_path / "state", durable=False)
        made.append(Coordinator(dataclasses.replace(base, **changes), MODEL))
        return made[-1]

    yield factory
    for coordinator in made:
        coordinator.shutdown(timeout=5)


def test_round_below_quorum_is_aborted_and_the_model_kept(make: Make) -> None:
    coordinator = make(round_timeout=0.3, quorum=2)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(coordinator, "a", 1)
    reg = coordinator.register("a")  # re-sync
    assert (reg.first_round, reg.model_round) == (2, 0)
    assert coordinator.model.header.round == 0


def test_deadline_closes_with_quorum_and_drops_the_silent_client(make: Make) -> None:
    coordinator = make(round_timeout=0.3, quorum=1)
    for name in ("a", "b"):
        coordinator.register(name)
    send(coordinator, "a", 1, 4.0)
    model = wait(coordinator, "a", 1)
    assert model.header.num_updates == 1
    send(coordinator, "a", 2, 2.0)  # b is inactive now: round 2 needs only a
    assert wait(coordinator, "a", 2).header.num_updates == 1
    with pytest.raises(errors.NotInCohortError):
        send(coordinator, "b", 3, 1.0)


def test_restart_resumes_the_open_round_with_acknowledged_updates(tmp_path: Path) -> None:
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True)
    first = Coordinator(config, MODEL)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    first._state.close()  # what a crash does to the lock; nothing else is flushed
    second = Coordinator(config, MODEL)
    try:
        assert_still_counted(second, "a", 1, 1.0, "the acknowledged update was lost")
        send(second, "b", 1, 3.0)
        assert wait(second, "a", 1).header.num_updates == 2
    finally:
        second.shutdown(timeout=5)


def test_a_retry_racing_its_original_is_a_durable_duplicate(tmp_path: Path) -> None:
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True)
    coordinator = Coordinator(config, MODEL)
    try:
        coordinator.register("a")
        coordinator.register("b")
        header, chunks = update("a", 1, 1.0)
        # Both calls got past check_submit before either was counted.
        first = coordinator.receive(header, chunks)
        again = coordinator.receive(header, chunks)
        assert (first.duplicate, again.duplicate) == (False, True)
        assert (first.received, again.received) == (1, 1)
        assert sorted(p.name for p in (tmp_path / "s" / "updates" / "round-00000001").glob(
            "*.update")) == ["a.update"]
        send(coordinator, "b", 1, 3.0)
        assert wait(coordinator, "a", 1).header.num_updates == 2
    finally:
        coordinator.shutdown(timeout=5)


def _disk_error(*args: object, **kwargs: object) -> bytearray:
    raise OSError(5, "Input/output error")


def test_a_failed_aggregation_stops_the_server_and_a_restart_redoes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures: list[BaseException] = []
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True,
                          on_failure=failures.append)
    first = Coordinator(config, MODEL)

    monkeypatch.setattr("paramserver.coordinator.aggregate", _disk_error)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    send(first, "b", 1, 3.0)  # closes round 1; its aggregation fails
    with pytest.raises(errors.ShuttingDownError):
        wait(first, "a", 1)  # released at once, not held until a deadline
    assert [type(e) for e in failures] == [OSError]
    first.shutdown(timeout=5)
    monkeypatch.undo()
    second = Coordinator(dataclasses.replace(config, on_failure=None), MODEL)
    try:
        model = wait(second, "a", 1)
        assert model.header.num_updates == 2
        assert torch.equal(codec.state_dict_from_payload(second.specs, model.payload)["w"],
                           torch.full((5,), 2.0))
    finally:
        second.shutdown(timeout=5)


def test_a_deadline_close_survives_a_failed_aggregation_and_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """closed.json: the restarted server aggregates exactly the updates the
    round closed with, though the silent client could now send."""
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True,
                          round_timeout=0.3, quorum=1, on_failure=lambda error: None)
    first = Coordinator(config, MODEL)
    monkeypatch.setattr("paramserver.coordinator.aggregate", _disk_error)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 4.0)
    with pytest.raises(errors.ShuttingDownError):
        wait(first, "a", 1)  # closed at the deadline without b; aggregation fails
    first.shutdown(timeout=5)
    monkeypatch.undo()
    # No deadline now: only the record of the close can keep b out.
    second = Coordinator(dataclasses.replace(config, round_timeout=None), MODEL)
    try:
        with pytest.raises(errors.NotInCohortError):  # the round closed without b
            send(second, "b", 1, 0.0)
        model = wait(second, "a", 1)
        assert model.header.num_updates == 1
    finally:
        second.shutdown(timeout=5)


def test_an_aborted_round_stays_aborted_after_a_restart(tmp_path: Path) -> None:
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True,
                          round_timeout=0.3, quorum=2)
    first = Coordinator(config, MODEL)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(first, "a", 1)
    assert first.register("a").first_round == 2
    send(first, "a", 2, 2.0)  # acknowledged for round 2
    first._state.close()  # a crash
    second = Coordinator(dataclasses.replace(config, round_timeout=None), MODEL)
    try:
        assert_still_counted(second, "a", 2, 2.0,
                             "round 1 reopened: the acknowledged round-2 update is lost")
        send(second, "b", 2, 4.0)
        assert wait(second, "a", 2).header.num_updates == 2
    finally:
        second.shutdown(timeout=5)


def test_every_ack_follows_the_fsync_of_its_round_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = spool.fsync_dir

    def spy(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(spool, "fsync_dir", spy)
    coordinator = Coordinator(ServerConfig(min_clients=2, state_dir=tmp_path / "s",
                                           durable=True), MODEL)
    round_dir = tmp_path / "s" / "updates" / "round-00000001"
    try:
        coordinator.register("a")
        coordinator.register("b")
        header, chunks = update("a", 1, 1.0)
        synced.clear()
        assert not coordinator.receive(header, chunks).duplicate
        assert synced == [round_dir], "acknowledged before its rename was durable"
        synced.clear()
        duplicate = coordinator.check_submit(header)  # a retry, its original maybe in flight
        assert duplicate is not None
        assert synced == [round_dir], "a duplicate acknowledged before the original is durable"
    finally:
        coordinator.shutdown(timeout=5)


def test_a_failing_evaluator_does_not_stop_the_rounds(make: Make) -> None:
    def broken(model: object) -> dict[str, float]:
        raise ValueError("evaluator bug")

    coordinator = make(evaluator=broken)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    send(coordinator, "b", 1, 3.0)
    model = wait(coordinator, "a", 1)
    assert model.header.num_updates == 2
    assert not any(key.startswith("eval_") for key in model.header.metrics)


def test_shutdown_releases_waiters_with_unavailable(make: Make) -> None:
    coordinator = make()
    coordinator.register("a")
    coordinator.register("b")
    raised: list[BaseException] = []

    def waiter() -> None:
        try:
            wait(coordinator, "a", 1)
        except errors.ParamServerError as error:
            raised.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    coordinator.shutdown()
    thread.join(5)
    assert [type(e) for e in raised] == [errors.ShuttingDownError]
    with pytest.raises(errors.ShuttingDownError):
        coordinator.register("c")


def test_corrupt_latest_model_is_rebuilt_and_next_round_updates_kept(tmp_path: Path) -> None:
    config = ServerConfig(min_clients=2, state_dir=tmp_path / "s", durable=True)
    first = Coordinator(config, MODEL)
    for name in ("a", "b"):
        first.register(name)
    send(first, "a", 1, 1.0)
    send(first, "b", 1, 3.0)
    published = wait(first, "a", 1).header
    send(first, "a", 2, 5.0)  # acknowledged for round 2
    first._state.close()
    latest = tmp_path / "s" / "global.model"
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0xFF
    latest.write_bytes(bytes(data))
    second = Coordinator(config, MODEL)
    try:
        assert wait(second, "a", 1).header == published  # rebuilt bit for bit from round 1
        assert_still_counted(second, "a", 2, 5.0, "the acknowledged round-2 update was lost")
        send(second, "b", 2, 7.0)
        assert wait(second, "b", 2).header.num_updates == 2
    finally:
        second.shutdown(timeout=5)
