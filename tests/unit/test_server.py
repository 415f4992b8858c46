"""The transport in-process: real gRPC on 127.0.0.1:0, status codes, waiting."""

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from paramserver import codec, errors, wire
from paramserver.averaging import average_state_dicts
from paramserver.client import ParameterServerClient, RemoteError, RetryPolicy
from paramserver.coordinator import ServerConfig
from paramserver.server import (
    STATUS_BY_ERROR,
    ParameterServerServicer,
    RunningServer,
    _Guard,
    _method_handlers,
    create_server,
    status_code_for,
)
from paramserver.v1 import parameter_server_pb2 as pb
from paramserver.v1 import parameter_server_pb2_grpc as pb_grpc

MODEL = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "n": torch.tensor(0)}

@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = create_server(ServerConfig(clients=2, total_rounds=2, state_dir=tmp_path,
                                         chunk_size=16), MODEL)
    try:
        yield running
    finally:
        running.stop(grace=0)

@pytest.fixture(params=[False, True], ids=["unary", "streaming"])
def client(server: RunningServer, request: pytest.FixtureRequest,
           ) -> Iterator[ParameterServerClient]:
    with ParameterServerClient(f"127.0.0.1:{server.port}", timeout=10, chunk_size=16,
                               streaming=request.param) as c:
        yield c

def update(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((3,), -value),
            "n": torch.tensor(int(value))}

def test_round_trip_through_the_barrier(client: ParameterServerClient) -> None:
    reg_a, reg_b = client.register("a"), client.register("b")
    assert (reg_a.first_round, reg_b.first_round, reg_a.total_rounds) == (1, 1, 2)
    assert reg_a.specs == codec.spec_of(MODEL)
    header, initial = client.get_model("a", 0)
    assert header.round == 0
    assert torch.equal(initial["w"], MODEL["w"])
    ack = client.send_update("a", 1, update(1.0), 10, {"loss": 1.0})
    assert (ack.received, ack.expected, ack.duplicate) == (1, 2, False)
    assert client.send_update("a", 1, update(1.0), 10).duplicate
    client.send_update("b", 1, update(3.0), 30, {"loss": 2.0})
    header, model = client.get_model("b", 1)
    expected = average_state_dicts({"a": (10, update(1.0)), "b": (30, update(3.0))})
    assert header.sha256 == codec.state_dict_digest(expected)
    assert (header.num_updates, header.total_examples) == (2, 40)
    assert header.metrics["loss"] == pytest.approx(1.75)
    assert codec.state_dict_digest(model) == header.sha256

def test_exchange_sends_and_returns_the_round_model(client: ParameterServerClient) -> None:
    client.register("a")
    client.register("b")
    results: dict[str, tuple[codec.ModelHeader, dict[str, torch.Tensor]]] = {}
    thread = threading.Thread(target=lambda: results.update(
        a=client.exchange("a", 1, update(1.0), 10, timeout=10)))
    thread.start()
    results["b"] = client.exchange("b", 1, update(3.0), 30, timeout=10)
    thread.join(timeout=10)
    expected = average_state_dicts({"a": (10, update(1.0)), "b": (30, update(3.0))})
    for header, model in results.values():
        assert (header.round, header.num_updates) == (1, 2)
        assert header.sha256 == codec.state_dict_digest(expected)
        assert codec.state_dict_digest(model) == header.sha256
    # A retry after a lost reply: counted once, the same model comes back.
    header, _ = client.exchange("a", 1, update(1.0), 10, timeout=10)
    assert (header.round, header.num_updates) == (1, 2)
    with pytest.raises(errors.StaleRoundError):  # a different update after the close
        client.exchange("a", 1, update(2.0), 10, timeout=10)


def test_download_streams_the_model_into_a_sink(server: RunningServer) -> None:
    with ParameterServerClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        c.register("a")
        c.register("b")
        c.send_update("a", 1, update(1.0), 10)
        c.send_update("b", 1, update(3.0), 30)
        chunks: list[memoryview] = []
        header = c.download_model("a", 1, chunks.append)
        _, model = c.get_model("a", 1)
    assert len(chunks) > 1, "chunk_size=16 splits the payload"
    assert header.round == 1
    assert header.sha256 == codec.state_dict_digest(model)
    assert b"".join(chunks) == b"".join(codec.payload_views(model))


def test_errors_carry_their_class_across_the_wire(client: ParameterServerClient) -> None:
    client.register("a")
    with pytest.raises(errors.UnknownClientError, match="ghost"):
        client.send_update("ghost", 1, update(1.0), 1)
    with pytest.raises(errors.FutureRoundError):
        client.get_model("a", 2, timeout=5)
    client.register("b")
    with pytest.raises(errors.MalformedUpdateError, match="'w'"):
        client.send_update("a", 1, {**update(1.0), "w": torch.zeros(3, 4)}, 1)
    with pytest.raises(errors.MalformedUpdateError, match=r"'b'.*NaN"):
        client.send_update("a", 1, {**update(1.0), "b": torch.full((3,), float("nan"))}, 1)
    client.send_update("a", 1, update(1.0), 1)
    with pytest.raises(errors.ConflictingUpdateError):
        client.send_update("a", 1, update(2.0), 1)

def test_waiting_for_an_open_round_honours_the_deadline(client: ParameterServerClient) -> None:
    client.register("a")
    client.register("b")
    with pytest.raises(errors.WaitTimeoutError) as info:
        client.get_model("a", 1, timeout=0.3)
    assert info.value.round == 1

def test_every_error_class_has_one_status() -> None:
    assert status_code_for(errors.StaleRoundError("c", 1, 2)) is grpc.StatusCode.FAILED_PRECONDITION
    assert status_code_for(errors.DecodeError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert grpc.StatusCode.OK not in STATUS_BY_ERROR.values()

def test_client_gives_up_after_retries_when_nobody_listens() -> None:
    policy = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
    with ParameterServerClient("127.0.0.1:1", timeout=2, retry=policy) as c, \
            pytest.raises(RemoteError) as info:
        c.register("a")
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_waiters_cannot_exhaust_the_server(tmp_path: Path) -> None:
    # capacity 2: at most 2 calls wait at the barrier; a third is refused at
    # once, and the uploads that release the waiters still get through.
    running = create_server(ServerConfig(clients=2, capacity=2, state_dir=tmp_path), MODEL)
    address = f"127.0.0.1:{running.port}"
    try:
        with ParameterServerClient(address, timeout=10) as c:
            c.register("a")
            c.register("b")
            results: list[str] = []
            waiters = [threading.Thread(target=lambda n=n: results.append(
                c.get_model(n, 1)[0].sha256.hex())) for n in ("a", "b")]
            for w in waiters:
                w.start()
            deadline = time.monotonic() + 10
            while running.coordinator._waiters < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(errors.CapacityError):
                c.get_model("a", 1, timeout=5)
            c.send_update("a", 1, update(1.0), 1)
            c.send_update("b", 1, update(2.0), 1)
            for w in waiters:
                w.join(10)
            assert len(results) == 2
            assert len(set(results)) == 1
    finally:
        running.stop(grace=0)


def test_health_is_served(server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        reply = check(health_pb2.HealthCheckRequest(service="paramserver.v1.ParameterServer"),
                      timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.health.enter_graceful_shutdown()
        reply = check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_unary_calls_refuse_models_over_the_limit(tmp_path: Path) -> None:
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB: over the 3 MiB unary limit
    running = create_server(ServerConfig(clients=1, state_dir=tmp_path), big)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ParameterServerStub(channel)  # type: ignore[no-untyped-call]
            stub.RegisterClient(pb.RegisterClientRequest(client_name="a"), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetAveragedModelUnary(pb.GetAveragedModelRequest(client_id="a", round=0),
                                           timeout=10)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "unary limit" in (info.value.details() or "")
        with ParameterServerClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            c.register("a")  # the library streams a model this size
            _, model = c.get_model("a", 0)
            assert torch.equal(model["w"], big["w"])
    finally:
        running.stop(grace=0)


def test_the_handlers_serve_every_method_of_the_proto_as_declared() -> None:
    # The table only refers to the servicer's methods: no coordinator needed.
    handlers = _method_handlers(ParameterServerServicer.__new__(ParameterServerServicer),
                                _Guard.__new__(_Guard))
    declared = wire.SERVICE.methods
    assert sorted(handlers) == sorted(m.name for m in declared)
    for method in declared:
        handler = handlers[method.name]
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming, method.server_streaming), method.name


@pytest.mark.parametrize("method", ["SendUpdateUnary", "ExchangeUnary", "SendUpdate"])
def test_unparseable_bytes_get_invalid_argument_naming_the_message(
        server: RunningServer, method: str) -> None:
    garbage = b"\x0a\x05ab"  # a header field cut short
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        path = wire.method_path(method)
        stream: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(path)
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        def call() -> object:
            if method == "SendUpdate":
                return stream(iter([garbage]), timeout=10)
            return unary(garbage, timeout=10)

        with pytest.raises(grpc.RpcError) as caught:
            call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = "SendUpdateRequest" if method == "SendUpdate" else "UpdateMessage"
    assert f"cannot parse {expected}" in (caught.value.details() or "")


def test_a_client_built_from_the_proto_alone_runs_a_round(server: RunningServer) -> None:
    """The generated stub, with protobuf's own (de)serializers, against the
    server's wire decoders: streamed and unary, both directions."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ParameterServerStub(channel)  # type: ignore[no-untyped-call]
        ids = [stub.RegisterClient(pb.RegisterClientRequest(client_name=n), timeout=10).client_id
               for n in ("a", "b")]
        for client_id, value in zip(ids, (1.0, 3.0), strict=True):
            state = update(value)
            header = codec.UpdateHeader(client_id, 1, 10, codec.spec_of(state),
                                        codec.state_dict_digest(state))
            views = codec.payload_views(state)
            if value == 1.0:
                stub.SendUpdate(codec.update_requests(header, views, 16), timeout=10)
            else:
                stub.SendUpdateUnary(pb.UpdateMessage(
                    header=codec.update_header_to_proto(header),
                    data=b"".join(views)), timeout=10)
        request = pb.GetAveragedModelRequest(client_id=ids[0], round=1)
        unary = stub.GetAveragedModelUnary(request, timeout=10)
        streamed = list(stub.GetAveragedModel(request, timeout=10))
    expected = codec.payload_views(average_state_dicts({"a": (10, update(1.0)),
                                                        "b": (10, update(3.0))}))
    assert unary.data == b"".join(expected)
    assert streamed[0].header == unary.header
    assert b"".join(r.data for r in streamed[1:]) == unary.data
    assert codec.model_header_from_proto(unary.header).sha256 == hashlib.sha256(unary.data).digest()
