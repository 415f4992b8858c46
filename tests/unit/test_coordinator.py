"""The coordinator driven directly: deadlines (on a fake clock), aborts, resume
after a crash, a full disk, the end of a run, shutdown. Real threads and files,
no gRPC."""

import dataclasses
import errno
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from unit_fakes import FakeClock

from paramserver import codec, errors, spool, state
from paramserver.coordinator import Coordinator, GlobalModel, ServerConfig

MODEL = {"w": torch.zeros(5)}
WAIT = 30.0  # a guard against a hang, in real seconds; events end every wait


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
    """The model of `round`, waiting for the coordinator's threads (an event,
    not a duration: WAIT only guards against a hang)."""
    model = coordinator.wait_for_model(client, round, lambda: WAIT)
    assert model is not None, f"round {round} did not close"
    coordinator.fetched(client, round)  # as the transport does once it is sent
    return model


Make = Callable[..., Coordinator]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(tmp_path: Path, clock: FakeClock) -> Iterator[Make]:
    made: list[Coordinator] = []

    def factory(**changes: Any) -> Coordinator:
        base = ServerConfig(clients=2, state_dir=tmp_path / "state", durable=False)
        made.append(Coordinator(dataclasses.replace(base, **changes), MODEL, clock))
        return made[-1]

    yield factory
    for coordinator in made:
        coordinator.close(timeout=5)


def test_round_below_quorum_is_aborted_and_the_model_kept(make: Make, clock: FakeClock) -> None:
    coordinator = make(round_timeout=5.0, min_clients=2)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    clock.advance(5.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(coordinator, "a", 1)
    reg = coordinator.register("a")  # re-sync
    assert (reg.first_round, reg.model_round) == (2, 0)
    assert coordinator.model.header.round == 0


def test_deadline_closes_with_quorum_and_drops_the_silent_client(
        make: Make, clock: FakeClock) -> None:
    coordinator = make(round_timeout=5.0, min_clients=1)
    for name in ("a", "b"):
        coordinator.register(name)
    send(coordinator, "a", 1, 4.0)
    clock.advance(5.0)
    model = wait(coordinator, "a", 1)
    assert model.header.num_updates == 1
    send(coordinator, "a", 2, 2.0)  # b is inactive now: round 2 needs only a
    assert wait(coordinator, "a", 2).header.num_updates == 1
    with pytest.raises(errors.NotInCohortError):
        send(coordinator, "b", 3, 1.0)


def test_the_deadline_counts_from_the_first_update_not_the_opening(
        make: Make, clock: FakeClock) -> None:
    """A slow first round (every client still training) is not aborted."""
    coordinator = make(round_timeout=5.0, min_clients=2)
    coordinator.register("a")
    coordinator.register("b")
    clock.advance(60.0)  # long past "opening + timeout"
    send(coordinator, "a", 1, 1.0)
    clock.advance(4.0)
    send(coordinator, "b", 1, 3.0)
    assert wait(coordinator, "a", 1).header.num_updates == 2


def test_a_round_waiting_for_clients_after_an_abort_does_not_hang(
        make: Make, clock: FakeClock) -> None:
    """--clients 2 --min-clients 2: round 1 aborts (b dead), round 2 waits for
    clients below quorum; its early update starts a clock that aborts it."""
    coordinator = make(round_timeout=3.0, min_clients=2, capacity=2)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    clock.advance(3.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(coordinator, "a", 1)
    assert coordinator.register("a").first_round == 2
    header, chunks = update("a", 2, 2.0)
    early = coordinator.submit(header, chunks)
    assert (early.received, early.expected) == (1, 0)
    clock.advance(3.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(coordinator, "a", 2)


def test_a_cancelled_upload_is_not_committed(make: Make) -> None:
    """A call that ended (cancel, deadline) before the commit does not count,
    leaves nothing on disk, and the client's next update is taken."""
    coordinator = make()
    coordinator.register("a")
    coordinator.register("b")
    header, chunks = update("a", 1, 1.0)
    with pytest.raises(errors.CallEndedError):
        coordinator.submit(header, chunks, alive=lambda: False)
    assert coordinator.check_submit(header) is None, "the cancelled upload was counted"
    assert not list((coordinator_root(coordinator) / "updates").rglob("*.update"))
    different, chunks = update("a", 1, 2.0)
    assert not coordinator.submit(different, chunks, alive=lambda: True).duplicate


def coordinator_root(coordinator: Coordinator) -> Path:
    return coordinator._state.root


def test_restart_resumes_the_open_round_with_acknowledged_updates(tmp_path: Path) -> None:
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True)
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
        second.close(timeout=5)


def test_a_retry_racing_its_original_is_a_durable_duplicate(tmp_path: Path) -> None:
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True)
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
        coordinator.close(timeout=5)


def _disk_error(*args: object, **kwargs: object) -> bytearray:
    raise OSError(5, "Input/output error")


def test_a_failed_aggregation_stops_the_server_and_a_restart_redoes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures: list[BaseException] = []
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True,
                          on_failure=failures.append)
    first = Coordinator(config, MODEL)

    monkeypatch.setattr("paramserver.coordinator.Driver.run", _disk_error)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    send(first, "b", 1, 3.0)  # closes round 1; reading its updates back fails
    with pytest.raises(errors.ShuttingDownError):
        wait(first, "a", 1)  # released at once, not held until a deadline
    assert [type(e) for e in failures] == [OSError]
    first.close(timeout=5)
    monkeypatch.undo()
    second = Coordinator(dataclasses.replace(config, on_failure=None), MODEL)
    try:
        model = wait(second, "a", 1)
        assert model.header.num_updates == 2
        assert torch.equal(codec.state_dict_from_payload(second.specs, model.payload)["w"],
                           torch.full((5,), 2.0))
    finally:
        second.close(timeout=5)


def test_a_deadline_close_survives_a_failed_aggregation_and_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """closed.json: the restarted server aggregates exactly the updates the
    round closed with, though the silent client could now send."""
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True,
                          round_timeout=5.0, min_clients=1, on_failure=lambda error: None)
    first = Coordinator(config, MODEL, clock)
    monkeypatch.setattr("paramserver.coordinator.Driver.run", _disk_error)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 4.0)
    clock.advance(5.0)
    with pytest.raises(errors.ShuttingDownError):
        wait(first, "a", 1)  # closed at the deadline without b; aggregation fails
    first.close(timeout=5)
    monkeypatch.undo()
    # No deadline now: only the record of the close can keep b out. The restart
    # re-aggregates in the background, so b's late update meets round 1 either
    # still closed without it or already published: refused as a RoundError
    # either way, and never counted.
    second = Coordinator(dataclasses.replace(config, round_timeout=None), MODEL)
    try:
        with pytest.raises(errors.RoundError):
            send(second, "b", 1, 0.0)
        model = wait(second, "a", 1)
        assert model.header.num_updates == 1
    finally:
        second.close(timeout=5)


def test_an_aborted_round_stays_aborted_after_a_restart(tmp_path: Path,
                                                        clock: FakeClock) -> None:
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True,
                          round_timeout=5.0, min_clients=2)
    first = Coordinator(config, MODEL, clock)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    clock.advance(5.0)
    with pytest.raises(errors.RoundAbortedError):
        wait(first, "a", 1)
    assert first.register("a").first_round == 2
    send(first, "a", 2, 2.0)  # acknowledged for round 2
    first.shutdown()
    first._state.close()  # a crash
    second = Coordinator(dataclasses.replace(config, round_timeout=None), MODEL)
    try:
        assert_still_counted(second, "a", 2, 2.0,
                             "round 1 reopened: the acknowledged round-2 update is lost")
        send(second, "b", 2, 4.0)
        assert wait(second, "a", 2).header.num_updates == 2
    finally:
        second.close(timeout=5)


def test_every_ack_follows_the_fsync_of_its_round_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = spool.fsync_dir

    def spy(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(spool, "fsync_dir", spy)
    coordinator = Coordinator(ServerConfig(clients=2, state_dir=tmp_path / "s",
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
        coordinator.close(timeout=5)


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
    waiting = threading.Event()

    def waiter() -> None:
        def remaining() -> float:
            waiting.set()  # inside the wait, holding no lock of ours
            return WAIT

        try:
            coordinator.wait_for_model("a", 1, remaining)
        except errors.ParamServerError as error:
            raised.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(WAIT)
    coordinator.shutdown()
    thread.join(WAIT)
    assert [type(e) for e in raised] == [errors.ShuttingDownError]
    with pytest.raises(errors.ShuttingDownError):
        coordinator.register("c")


def test_corrupt_latest_model_is_rebuilt_and_next_round_updates_kept(tmp_path: Path) -> None:
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=True)
    first = Coordinator(config, MODEL)
    for name in ("a", "b"):
        first.register(name)
    send(first, "a", 1, 1.0)
    send(first, "b", 1, 3.0)
    published = wait(first, "a", 1).header
    send(first, "a", 2, 5.0)  # acknowledged for round 2
    first.shutdown()
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
        second.close(timeout=5)


# -- a full disk ---------------------------------------------------------------------


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_refuses_the_upload_retryably_and_counts_nothing(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    health: list[bool] = []
    coordinator = make(on_storage=health.append)
    coordinator.register("a")
    coordinator.register("b")
    header, chunks = update("a", 1, 1.0)
    with monkeypatch.context() as full:
        full.setattr(spool.SpoolWriter, "write", _disk_full)
        with pytest.raises(errors.StorageError, match="No space left"):
            coordinator.submit(header, chunks)
    assert health == [False]
    assert coordinator.check_submit(header) is None, "an update that was not written counts"
    assert not list((coordinator_root(coordinator) / "updates").rglob("*.update*"))
    assert not coordinator.submit(header, chunks).duplicate  # space again: it is taken
    assert health == [False, True]


def test_a_global_model_the_disk_refuses_is_written_once_it_can_be(
        make: Make, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """The round stays closed, its waiters wait, and the model is retried: no
    fail-stop, no client released with an error."""
    health: list[bool] = []
    refused = threading.Event()
    real = state.StateDir.save_model

    def full_once(self: state.StateDir, *args: Any, **kwargs: Any) -> None:
        if not refused.is_set():
            refused.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, *args, **kwargs)

    monkeypatch.setattr(state.StateDir, "save_model", full_once)
    coordinator = make(on_storage=health.append)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    send(coordinator, "b", 1, 3.0)
    assert refused.wait(WAIT)
    assert clock.wait_for_sleeper()  # the aggregation backs off before it retries
    clock.advance(60.0)
    assert wait(coordinator, "a", 1).header.num_updates == 2
    assert health == [False, True]


def test_a_state_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(state.StateDirError, match=r"cannot use .* as the state dir"):
        Coordinator(ServerConfig(state_dir=path), MODEL)


# -- the end of a run ------------------------------------------------------------------


def test_a_finished_run_serves_its_final_model_after_a_restart(tmp_path: Path,
                                                              clock: FakeClock) -> None:
    """A crash just after the last round was published: the restarted server
    serves the final model (and the retry of a lost ack), then says it is done
    once every client has fetched it."""
    config = ServerConfig(clients=2, total_rounds=1, state_dir=tmp_path / "s", durable=True)
    first = Coordinator(config, MODEL, clock)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    send(first, "b", 1, 3.0)
    final = wait(first, "a", 1).header
    first.shutdown()
    first._state.close()  # a crash
    done = threading.Event()
    second = Coordinator(dataclasses.replace(config, on_finished=done.set), MODEL, clock)
    try:
        assert second.finished
        reg = second.register("b")
        assert (reg.first_round, reg.model_round) == (2, 1)
        assert_still_counted(second, "b", 1, 3.0, "the retry of b's lost ack was refused")
        with pytest.raises(errors.RunFinishedError):
            send(second, "b", 2, 3.0)
        assert wait(second, "b", 1).header == final
        assert not done.is_set()  # a has not fetched it yet
        assert wait(second, "a", 1).header == final
        assert done.wait(WAIT)
    finally:
        second.close(timeout=5)


def test_a_finished_run_stops_lingering_after_its_linger_time(make: Make,
                                                              clock: FakeClock) -> None:
    done = threading.Event()
    coordinator = make(total_rounds=1, linger=30.0, on_finished=done.set)
    coordinator.register("a")
    coordinator.register("b")
    send(coordinator, "a", 1, 1.0)
    send(coordinator, "b", 1, 1.0)
    wait(coordinator, "a", 1)  # b never fetches the final model
    assert not done.is_set()
    clock.advance(30.0)
    assert done.wait(WAIT)


def test_a_client_with_another_model_is_refused_before_it_joins(make: Make) -> None:
    coordinator = make(clients=1)
    other = codec.spec_of({"w": torch.zeros(6)})
    with pytest.raises(errors.ModelMismatchError, match=r"'w'.*shape \[6\], expected \[5\]"):
        coordinator.register("a", other)
    assert not coordinator._machine.registered, "the refused client was registered"
    assert coordinator.register("a", coordinator.specs).first_round == 1


def test_a_restart_keeps_the_rounds_timing(tmp_path: Path, clock: FakeClock) -> None:
    """a took 20 s to its first update (a cold start); after a crash the
    clients that have not sent still get those 20 s plus the timeout."""
    config = ServerConfig(clients=3, min_clients=1, round_timeout=5.0,
                          state_dir=tmp_path / "s", durable=True)
    first = Coordinator(config, MODEL, clock)
    for name in ("a", "b", "c"):
        first.register(name)
    clock.advance(20.0)
    send(first, "a", 1, 1.0)
    first.shutdown()
    first._state.close()  # a crash
    second = Coordinator(config, MODEL, clock)
    try:
        assert second._machine.deadline == clock.now() + 20.0 + 5.0
    finally:
        second.close(timeout=5)


def test_fresh_discards_a_run_only_once_it_holds_the_lock(tmp_path: Path) -> None:
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=False)
    first = Coordinator(config, MODEL)
    first.register("a")
    with pytest.raises(state.StateDirError, match="in use by another server"):
        Coordinator(dataclasses.replace(config, fresh=True), MODEL)
    assert (tmp_path / "s" / "clients.json").exists(), "--fresh deleted a locked run"
    first.close(timeout=5)
    second = Coordinator(dataclasses.replace(config, fresh=True), MODEL)
    try:
        assert second.register("a").is_new
    finally:
        second.close(timeout=5)


def test_fresh_never_empties_a_directory_that_is_not_a_state_dir(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(state.StateDirError, match="not a paramserver state dir"):
        Coordinator(ServerConfig(state_dir=precious, fresh=True), MODEL)
    assert (precious / "thesis.tex").read_text() == "years of work"


def stopped_in_round_one(tmp_path: Path) -> ServerConfig:
    """The config of a server that stopped in round 1 with a's update."""
    config = ServerConfig(clients=2, state_dir=tmp_path / "s", durable=False)
    first = Coordinator(config, MODEL)
    first.register("a")
    first.register("b")
    send(first, "a", 1, 1.0)
    first.close()
    return config


@pytest.mark.parametrize(("name", "content"), [
    ("clients.json", b"[1, 2]"),
    ("clients.json", b'{"a": "x"}'),
    ("run.json", b"\xff\xfe not json"),
    ("run.json", b"[" * 100_000),
    ("updates/round-00000001/cohort.json", b'{"round": 1, "cohort": []}'),
    ("updates/round-00000001/cohort.json", b'{"round": 1, "cohort": 7}'),
    ("updates/round-00000001/closed.json", b'{"round": 1}'),
    ("updates/round-00000001/closed.json", b'{"round": 1, "clients": []}'),
])
def test_a_damaged_resume_file_is_refused_naming_it(tmp_path: Path, name: str,
                                                    content: bytes) -> None:
    """Found by tests/property/test_fuzz_decoders.py: these escaped as
    JSONDecodeError, AttributeError, RecursionError, or (an empty closed
    cohort) failed the aggregation of a round with no updates."""
    config = stopped_in_round_one(tmp_path)
    (tmp_path / "s" / name).write_bytes(content)
    with pytest.raises(state.StateDirError, match=f"{name.rsplit('/', 1)[-1]} is corrupt"):
        Coordinator(config, MODEL)


def test_a_damaged_timing_file_only_loses_the_timing(tmp_path: Path) -> None:
    config = stopped_in_round_one(tmp_path)
    (tmp_path / "s" / "updates/round-00000001/timing.json").write_bytes(
        b'{"round": 1, "fastest": ' + b"9" * 400 + b"}")
    second = Coordinator(config, MODEL)
    try:
        assert_still_counted(second, "a", 1, 1.0, "the acknowledged update was lost")
    finally:
        second.close(timeout=5)


def test_an_update_file_of_another_model_is_discarded_on_resume(tmp_path: Path) -> None:
    config = stopped_in_round_one(tmp_path)
    path = tmp_path / "s" / "updates/round-00000001/a.update"
    other = codec.UpdateHeader("a", 1, 1, codec.spec_of({"w": torch.zeros(6)}), bytes(32))
    encoded = codec.update_header_to_proto(other).SerializeToString()
    path.write_bytes(spool.UPDATE_MAGIC + len(encoded).to_bytes(4, "little") + encoded)
    second = Coordinator(config, MODEL)  # raised MalformedUpdateError before
    try:
        assert second.check_submit(update("a", 1, 1.0)[0]) is None
        assert not path.exists()
    finally:
        second.close(timeout=5)
