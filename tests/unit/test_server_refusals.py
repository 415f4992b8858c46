"""The transport's refusals and lifecycle, in-process on 127.0.0.1:0: every RPC
answers bytes it cannot parse with INVALID_ARGUMENT, refusals stay small, an
upload counts only while its call is alive, a full disk is UNAVAILABLE (and
health says so), the state dir is released last, a failed bind leaves nothing
locked."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver import codec, errors, spool, wire
from paramserver.client import ParameterServerClient, RetryPolicy
from paramserver.coordinator import ServerConfig
from paramserver.server import (
    MAX_STATUS_MESSAGE,
    BindError,
    ParameterServerServicer,
    RunningServer,
    _abort,
    create_server,
)
from paramserver.state import LOCK_FILE
from paramserver.v1 import parameter_server_pb2 as pb

MODEL = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
TIMEOUT = 10.0  # per call; every call here is answered at once


@contextlib.contextmanager
def serving(state_dir: Path, **config: object) -> Iterator[RunningServer]:
    running = create_server(ServerConfig(**{"clients": 2, "state_dir": state_dir,
                                            **config}), MODEL)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop(grace=0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serving(tmp_path / "state") as running:
        yield running


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def raw(channel: grpc.Channel, method: str) -> Callable[[bytes], object]:
    """A call of `method` with bytes as they are (no serializer)."""
    path = wire.method_path(method)
    if method == "SendUpdate":
        stream: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(path)
        return lambda data: stream(iter([data]), timeout=TIMEOUT)
    if method == "GetAveragedModel":
        server_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return lambda data: list(server_stream(data, timeout=TIMEOUT))
    if method == "SecureAggregation":
        both: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        return lambda data: list(both(iter([data]), timeout=TIMEOUT))
    unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return lambda data: unary(data, timeout=TIMEOUT)


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the refusal carries no google.rpc.Status"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


METHODS = [m.name for m in wire.SERVICE.methods]
MESSAGES = {"RegisterClient": "RegisterClientRequest", "SendUpdate": "SendUpdateRequest",
            "GetAveragedModel": "GetAveragedModelRequest", "SendUpdateUnary": "UpdateMessage",
            "GetAveragedModelUnary": "GetAveragedModelRequest", "ExchangeUnary": "UpdateMessage",
            "NextRound": "NextRoundRequest", "ReportEvaluation": "EvaluationReport",
            "SecureAggregation": "SecAggClientMessage"}


# -- bytes that do not parse ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("garbage", [b"\x0a\x05", b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"],
                         ids=["truncated", "not-utf8", "bad-tag"])
def test_every_rpc_answers_unparseable_bytes_with_invalid_argument(
        channel: grpc.Channel, method: str, garbage: bytes) -> None:
    error = refusal(lambda: raw(channel, method)(garbage))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
    assert f"cannot parse {MESSAGES[method]}" in (error.details() or "")


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_requests_never_get_internal_or_unknown(tmp_path: Path, method: str) -> None:
    with (serving(tmp_path / "state") as running,
          grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch):
        call = raw(ch, method)

        @settings(max_examples=150, database=None)
        @given(st.binary(max_size=64))
        def fuzz(data: bytes) -> None:
            code = grpc.StatusCode.OK
            try:
                call(data)
            except grpc.RpcError as error:
                code = error.code()
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{method}({data!r}): {code}")

        fuzz()


# -- refusals stay small ------------------------------------------------------------------


def header_with(specs: list[pb.TensorSpec]) -> pb.UpdateHeader:
    return pb.UpdateHeader(client_id="a", round=1, num_examples=1, tensors=specs,
                           sha256=b"\x00" * 32)


def test_refusals_of_huge_headers_stay_small(channel: grpc.Channel) -> None:
    """5,000 or 100,000 specs are refused by their count, before any is
    decoded; two specs with 100 kB names are refused naming them cut short.
    Every message fits in the status (else the client would see
    RESOURCE_EXHAUSTED about metadata instead of the refusal)."""
    raw(channel, "RegisterClient")(pb.RegisterClientRequest(client_name="a").SerializeToString())
    spec = pb.TensorSpec(name="wrong", dtype=pb.DTYPE_FLOAT32, shape=[1])
    send = raw(channel, "SendUpdateUnary")
    for count in (5000, 100_000):
        message = wire.encode(header_with([spec] * count), [b""])
        error = refusal(functools.partial(send, message))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert f"{count} tensor specs, the model has 2" in (error.details() or "")
    long_names = [pb.TensorSpec(name=f"{i}" + "x" * 100_000, dtype=pb.DTYPE_FLOAT32, shape=[1])
                  for i in range(2)]
    message = wire.encode(header_with(long_names), [b"\x00" * 8])
    error = refusal(lambda: raw(channel, "SendUpdateUnary")(message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor names differ" in (error.details() or "")
    assert len(error.details() or "") <= MAX_STATUS_MESSAGE


def test_a_huge_name_is_refused_in_a_bounded_message(channel: grpc.Channel) -> None:
    request = pb.RegisterClientRequest(client_name="n" * 1_000_000)
    error = refusal(lambda: raw(channel, "RegisterClient")(request.SerializeToString()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details() or "") <= MAX_STATUS_MESSAGE
    assert reason(error) == "InvalidClientNameError"


def test_an_update_message_without_a_header_says_so(channel: grpc.Channel) -> None:
    for method in ("SendUpdateUnary", "ExchangeUnary"):
        error = refusal(functools.partial(raw(channel, method), wire.encode(None, [b"x"])))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has no header" in (error.details() or ""), error.details()


# -- registration checks the client's model ------------------------------------------------


def test_a_client_with_another_model_is_refused_before_it_joins(server: RunningServer) -> None:
    address = f"127.0.0.1:{server.port}"
    with ParameterServerClient(address, timeout=TIMEOUT) as client:
        other = codec.spec_of({"w": torch.zeros(4, 4), "b": torch.zeros(3)})
        with pytest.raises(errors.ModelMismatchError, match=r"'w'.*shape \[4, 4\]"):
            client.register("cnn", other)
        with pytest.raises(errors.UnknownClientError):  # it never joined
            client.get_model("cnn", 0)
        assert client.register("mlp", codec.spec_of(MODEL)).first_round == 1


# -- an upload counts only while its call is alive ------------------------------------------


def upload_messages(client: str, value: float) -> list[bytes]:
    state = {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}
    views = codec.payload_views(state)
    header = codec.UpdateHeader(client, 1, 1, codec.spec_of(state), codec.payload_digest(views))
    return list(wire.stream(codec.update_header_to_proto(header), views, 16))


def test_an_upload_that_never_half_closes_does_not_count(channel: grpc.Channel) -> None:
    """Every byte sent, then the client's deadline passes instead of a
    half-close: DEADLINE_EXCEEDED, not counted, and the client's next,
    different update for the round is taken (not ALREADY_EXISTS)."""
    register = raw(channel, "RegisterClient")
    for name in ("a", "b"):
        register(pb.RegisterClientRequest(client_name=name).SerializeToString())
    send: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
        wire.method_path("SendUpdate"))
    finished = threading.Event()

    def never_half_closes() -> Iterator[bytes]:
        yield from upload_messages("a", 1.0)
        finished.wait(TIMEOUT)

    error = refusal(lambda: send(never_half_closes(), timeout=1.0))
    finished.set()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ack = pb.SendUpdateResponse.FromString(
        send(iter(upload_messages("a", 2.0)), timeout=TIMEOUT))
    assert (ack.duplicate, ack.received) == (False, 1)


# -- a full disk -------------------------------------------------------------------------------


def health_status(channel: grpc.Channel) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return int(check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status)


def test_a_full_disk_is_unavailable_and_not_serving_until_it_has_space(
        server: RunningServer, channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{server.port}"
    full = threading.Event()
    full.set()
    real_write = spool.SpoolWriter.write

    def write(self: spool.SpoolWriter, data: codec.Buffer) -> None:
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(spool.SpoolWriter, "write", write)
    with ParameterServerClient(address, timeout=TIMEOUT) as client:
        client.register("a")
        state = {"w": torch.ones(4, 3), "b": torch.ones(3)}
        error = refusal(lambda: raw(channel, "SendUpdateUnary")(
            wire.encode(codec.update_header_to_proto(codec.UpdateHeader(
                "a", 1, 1, codec.spec_of(state), codec.state_dict_digest(state))),
                codec.payload_views(state))))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(error) == "StorageError"
        assert "No space left" in (error.details() or "")
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        full.clear()
        assert not client.send_update("a", 1, state, 1).duplicate  # nothing was counted
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_client_waits_out_a_full_disk(server: RunningServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """StorageError is retried however long it lasts: the server is alive and
    asks to wait (here three refusals, then space)."""
    refusals = iter(range(3))
    real_write = spool.SpoolWriter.write

    def write(self: spool.SpoolWriter, data: codec.Buffer) -> None:
        if next(refusals, None) is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(spool.SpoolWriter, "write", write)
    slept: list[float] = []
    policy = RetryPolicy(attempts=10, give_up_after=0.0, sleep=slept.append)
    with ParameterServerClient(f"127.0.0.1:{server.port}", timeout=TIMEOUT,
                               retry=policy) as client:
        client.register("a")
        ack = client.send_update("a", 1, {"w": torch.ones(4, 3), "b": torch.ones(3)}, 1)
    assert not ack.duplicate
    assert len(slept) == 3


def test_an_unreachable_server_is_given_up_after_the_connect_timeout() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(attempts=1000, give_up_after=5.0, sleep=sleep, now=lambda: sum(slept))
    with (ParameterServerClient(f"127.0.0.1:{port}", timeout=TIMEOUT, retry=policy) as client,
          pytest.raises(errors.ParamServerError, match="UNAVAILABLE")):
        client.register("a")
    assert sum(slept) == pytest.approx(5.0)  # gave up after 5 s of backoff, not 1000 attempts
    assert all(s >= 0 for s in slept)
    assert len(slept) < 100


# -- lifecycle ---------------------------------------------------------------------------------


def lock_is_held(state_dir: Path) -> bool:
    with open(state_dir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_the_state_dir_is_released_last_after_in_flight_uploads(tmp_path: Path) -> None:
    """A graceful stop lets an upload in flight finish (and count) within its
    grace, and only then releases the state dir, so that a successor cannot
    take it while this server still writes."""
    state_dir = tmp_path / "state"
    running = create_server(ServerConfig(clients=2, state_dir=state_dir), MODEL)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        raw(channel, "RegisterClient")(pb.RegisterClientRequest(client_name="a")
                                       .SerializeToString())
        messages = upload_messages("a", 1.0)
        resume = threading.Event()

        def slow_upload() -> Iterator[bytes]:
            yield messages[0]
            resume.wait(TIMEOUT)
            yield from messages[1:]

        send: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            wire.method_path("SendUpdate"))
        future = send.future(slow_upload(), timeout=TIMEOUT)
        wait_until(lambda: any((state_dir / "updates").rglob("*.part")),
                   "the upload to be under way (its partial file)")
        stopper = threading.Thread(target=running.stop, kwargs={"grace": TIMEOUT})
        stopper.start()
        wait_until(lambda: health_status_or_gone(channel)
                   != health_pb2.HealthCheckResponse.SERVING, "the stop to begin")
        assert lock_is_held(state_dir), "released while an upload was in flight"
        resume.set()
        ack = pb.SendUpdateResponse.FromString(future.result())
        assert ack.received == 1
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert not lock_is_held(state_dir)
        assert list((state_dir / "updates").rglob("a.update")), "the acked upload is not on disk"
    finally:
        channel.close()
        running.stop(grace=0)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def health_status_or_gone(channel: grpc.Channel) -> int:
    try:
        return health_status(channel)
    except grpc.RpcError:
        return health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_failed_bind_leaves_nothing_locked(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{port}"):
            create_server(ServerConfig(clients=1, state_dir=tmp_path / "state"), MODEL,
                          f"127.0.0.1:{port}")
    assert not lock_is_held(tmp_path / "state")
    with serving(tmp_path / "state"):  # the same state dir, at once
        pass


class EndedCall:
    """A ServicerContext whose call has ended (the client cancelled) by the
    time the handler would commit: what gRPC reports a moment after the
    stream's last message."""

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 30.0

    def abort_with_status(self, status: object) -> None:
        raise RuntimeError(f"aborted: {status}")

    def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


def test_the_servicer_commits_an_upload_only_while_its_call_is_alive(tmp_path: Path) -> None:
    running = create_server(ServerConfig(clients=2, state_dir=tmp_path / "state"), MODEL)
    try:
        servicer = ParameterServerServicer(running.coordinator, 16, ServerConfig(clients=2))
        running.coordinator.register("a")
        decode = wire.Decoder(pb.SendUpdateRequest, pb.UpdateHeader)
        parts = [decode(m) for m in upload_messages("a", 1.0)]
        with pytest.raises(RuntimeError, match="aborted"):
            servicer.SendUpdate(iter(parts), EndedCall())  # type: ignore[arg-type]
        header = codec.update_header_from_proto(parts[0].header)  # type: ignore[arg-type]
        assert running.coordinator.check_submit(header) is None, "the ended upload counted"
    finally:
        running.stop(grace=0)


def test_every_status_message_and_detail_is_bounded() -> None:
    """Whatever an error says: the transport cuts it (the errors themselves
    quote values short too, see test_errors_quote_values_short)."""
    captured: list[object] = []

    class Capture(EndedCall):
        def abort_with_status(self, status: object) -> None:
            captured.append(status)
            raise RuntimeError("aborted")

    error = errors.ParamServerError("x" * 100_000)
    error.tensor = "t" * 100_000  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        _abort(Capture(), error)  # type: ignore[arg-type]
    status = captured[0]
    assert len(status.details) <= MAX_STATUS_MESSAGE  # type: ignore[attr-defined]
    info = error_details_pb2.ErrorInfo()
    status_proto = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"])  # type: ignore[attr-defined]
    assert status_proto.details[0].Unpack(info)
    assert all(len(v) <= 128 for v in info.metadata.values())


def test_errors_quote_values_short() -> None:
    assert len(str(errors.InvalidClientNameError("n" * 10**6, "too long"))) < 200
    assert len(str(errors.MalformedUpdateError("bad", tensor="t" * 10**6))) < 200


def test_a_waiting_call_that_ends_frees_its_slot(server: RunningServer,
                                                 channel: grpc.Channel) -> None:
    register = raw(channel, "RegisterClient")
    register(pb.RegisterClientRequest(client_name="a").SerializeToString())
    get: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        wire.method_path("GetAveragedModelUnary"))
    waiting = get.future(pb.GetAveragedModelRequest(client_id="a", round=1)
                         .SerializeToString(), timeout=TIMEOUT * 6)
    wait_until(lambda: server.coordinator._waiters == 1, "the call to wait at the barrier")
    waiting.cancel()
    wait_until(lambda: server.coordinator._waiters == 0, "the slot of the ended call to free")


def test_storage_refusals_do_not_use_up_the_attempts(server: RunningServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    refusals = iter(range(5))
    real_write = spool.SpoolWriter.write

    def write(self: spool.SpoolWriter, data: codec.Buffer) -> None:
        if next(refusals, None) is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(spool.SpoolWriter, "write", write)
    policy = RetryPolicy(attempts=2, sleep=lambda seconds: None)
    with ParameterServerClient(f"127.0.0.1:{server.port}", timeout=TIMEOUT,
                               retry=policy) as client:
        client.register("a")
        assert not client.send_update("a", 1, {"w": torch.ones(4, 3), "b": torch.ones(3)},
                                      1).duplicate
