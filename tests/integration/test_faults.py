"""Faults around durability, as real processes: SIGTERM with an upload in
flight (the state dir is released last), a crash just after the final model
is published (a restart serves it), a state dir that stops taking writes (no
client dies; the run goes on once there is space)."""

from __future__ import annotations

import fcntl
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from paramserver import codec, training, wire
from paramserver.faults import CRASH_ENV
from paramserver.state import LOCK_FILE
from paramserver.v1 import parameter_server_pb2 as pb

from .harness import ClientFactory, ServerFactory, ServerProcess, wait_for

CALL_TIMEOUT = 60.0
EXIT_TIMEOUT = 120.0


def lock_is_held(state_dir: Path) -> bool:
    with open(state_dir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def health(channel: grpc.Channel) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return int(check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status)


def update_stream(client: str, round: int) -> list[bytes]:
    state = training.build_model("mlp", 1).state_dict()
    views = codec.payload_views(state)
    header = codec.UpdateHeader(client, round, 10, codec.spec_of(state),
                                codec.payload_digest(views))
    return list(wire.stream(codec.update_header_to_proto(header), views, 64 << 10))


@pytest.mark.timeout(200)
def test_sigterm_releases_the_state_dir_only_after_in_flight_uploads(
        server_factory: ServerFactory) -> None:
    server = server_factory(clients=2)
    state_dir = server.workdir / "state"
    with grpc.insecure_channel(server.address) as channel:
        register = channel.unary_unary(wire.method_path("RegisterClient"),
                                       pb.RegisterClientRequest.SerializeToString,
                                       pb.RegisterClientResponse.FromString)
        register(pb.RegisterClientRequest(client_name="a"), timeout=CALL_TIMEOUT)
        messages = update_stream("a", 1)
        resume = threading.Event()

        def slow() -> Iterator[bytes]:
            yield from messages[:2]
            resume.wait(CALL_TIMEOUT)
            yield from messages[2:]

        send = channel.stream_unary(wire.method_path("SendUpdate"), wire.encoded,
                                    pb.SendUpdateResponse.FromString)
        upload = send.future(slow(), timeout=CALL_TIMEOUT)
        wait_for(lambda: any(server.spool_dir.rglob("*.part")) or None, CALL_TIMEOUT,
                 "the upload to be under way")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log(r"signal 15: shutting down")
        assert lock_is_held(state_dir), "the state dir was released with an upload in flight"
        resume.set()
        ack = upload.result()
        assert (ack.round, ack.received) == (1, 1)
    assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()
    assert not lock_is_held(state_dir)
    assert (server.spool_dir / "round-00000001" / "a.update").is_file()
    assert "Traceback" not in server.log()


@pytest.mark.timeout(300)
def test_a_crash_after_the_final_model_is_published_strands_nobody(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path) -> None:
    """kill -9 right after the last round is published, before the clients
    have the final model: the restarted server serves it (and acknowledges the
    retried last update as a duplicate) and stops cleanly when told to."""
    socket = tmp_path / "ps.sock"
    state = tmp_path / "state"
    extra = ("--unix-socket", str(socket))
    first = server_factory(*extra, clients=2, rounds=2, state_dir=state,
                           env={CRASH_ENV: "after_publish:2"})
    clients = [client_factory(name, f"unix:{socket}") for name in ("c1", "c2")]
    code = first.process.wait(EXIT_TIMEOUT)
    assert code == -signal.SIGKILL, first.log()
    # The clients may have fetched the final model from the first server
    # already; the second cannot know, and serves it for --linger seconds.
    second = server_factory(*extra, "--linger", "15", clients=2, rounds=2, state_dir=state)
    for client in clients:
        assert client.wait(EXIT_TIMEOUT) == 0, client.log()
    # Its linger (15 s) is long enough for clients on a busy machine; the
    # test does not wait it out.
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(EXIT_TIMEOUT) == 0, second.log()
    final = first.rounds()[-1]
    assert final["round"] == 2
    for client in clients:
        assert client.summary()["rounds"]["2"] == final["sha256"], client.log()
    assert "run finished after round 2; serving the final model" in second.log()


def limit_file_size(server: ServerProcess, limit: int | None) -> None:
    """RLIMIT_FSIZE of the server process (None: the hard limit): writes past
    `limit` bytes fail with EFBIG, as a full disk fails them with ENOSPC
    (Python ignores SIGXFSZ)."""
    process = psutil.Process(server.process.pid)
    hard = process.rlimit(psutil.RLIMIT_FSIZE)[1]
    process.rlimit(psutil.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


@pytest.mark.timeout(300)
def test_a_state_dir_that_refuses_writes_kills_no_client(
        server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """Uploads get UNAVAILABLE (retried), health says NOT_SERVING, nothing is
    acknowledged that was not written; once writes work again the run
    completes with every client."""
    server = server_factory(clients=2, rounds=2)
    assert server.log_size() < 64 << 10  # the server's own log stays writable
    limit_file_size(server, 200 << 10)  # below one update of the MLP (400 kB)
    clients = [client_factory(name, server) for name in ("c1", "c2")]
    server.wait_for_log(r"cannot write an update for round 1", timeout=EXIT_TIMEOUT)
    with grpc.insecure_channel(server.address) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not list(server.spool_dir.rglob("*.update")), "an unwritten update was kept"
        limit_file_size(server, None)
        for client in clients:
            assert client.wait(EXIT_TIMEOUT) == 0, client.log()
        records = server.wait_for_rounds(2)
    assert [(r["round"], r["num_updates"]) for r in records] == [(1, 2), (2, 2)]
    assert "takes writes again" in server.log()
