"""The client library: one method per RPC, a deadline on every call, retries
with exponential backoff and jitter for UNAVAILABLE, and status codes turned
back into our errors.

gRPC's transparent retries cannot replay a large client stream, so the retry
is ours; it is safe because the server acknowledges a re-sent identical update
(same SHA-256) as a duplicate and counts it once.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paramserver import codec, errors, faults, secagg_codec, security, wire
from paramserver.quantize import Quantization
from paramserver.v1 import parameter_server_pb2 as pb
from paramserver.v1 import parameter_server_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver.client")

T = TypeVar("T")

# Keepalive: a server that vanished without closing the connection (killed
# machine, cut cable) is noticed within about 15 s, even while waiting.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Codes worth retrying: the server is not there (yet, or any more), or it cut
# the call while shutting down (CANCELLED: this library never cancels its own
# calls). Every call is idempotent, so a retry is always safe.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# For calls that do not wait at the barrier, a deadline that passed means a
# server that hung (e.g. while being restarted): retry those too. For
# GetAveragedModel it is the caller's own limit on waiting, final.
RETRYABLE_SHORT_CALLS = RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}

# The inverse of server.STATUS_BY_ERROR, for errors whose details are missing.
# Not RESOURCE_EXHAUSTED: without our details it is gRPC's own limit (a message
# or its metadata too large), not the server's capacity.
ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.ParamServerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.MalformedUpdateError,
    grpc.StatusCode.NOT_FOUND: errors.UnknownClientError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.RoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.ConflictingUpdateError,
    grpc.StatusCode.ABORTED: errors.RoundAbortedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
}
_ERRORS_BY_NAME = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.ParamServerError)
}


class RemoteError(errors.ParamServerError):
    """A call failed with a status that maps to none of our errors
    (UNAVAILABLE after the last retry, DEADLINE_EXCEEDED, INTERNAL...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call the server could not answer (see RETRYABLE): at most
    `attempts` and for at most `give_up_after` seconds of not reaching it.
    While the server answers that its state dir refuses writes (StorageError)
    it is alive and asks to wait: neither those answers nor that time count,
    so a client outlasts a full disk for as long as the server does."""

    attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    give_up_after: float = float("inf")
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    now: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt)
        return random.uniform(0, cap)


@dataclass(frozen=True)
class Registration:
    """`model_round`: the global model to train on before sending for `first_round`.
    A `first_round` past `total_rounds` means the run has finished: `model_round`
    is its final model."""

    client_id: str
    first_round: int
    model_round: int
    total_rounds: int
    specs: codec.ModelSpec
    assigns_rounds: bool = False  # ask NextRound before every round
    config: Mapping[str, float] = field(default_factory=dict)
    strategy: str = "fedavg"
    # Secure aggregation: the quantisation and the SecAgg+ degree (None: off).
    secagg: tuple[Quantization, int] | None = None

    @property
    def run_finished(self) -> bool:
        return bool(self.total_rounds) and self.first_round > self.total_rounds


@dataclass(frozen=True)
class Ack:
    round: int
    duplicate: bool
    received: int
    expected: int


@dataclass
class ParameterServerClient:
    """A connection to one server. Use as a context manager, or call close()."""

    address: str
    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_size: int = codec.DEFAULT_CHUNK_SIZE
    # Models whose payload fits the server's unary limit go in one unary call
    # each way (much cheaper than a stream); `streaming=True` never does that.
    streaming: bool = False
    # TLS, a client certificate, a bearer token (None: plaintext, no token).
    credentials: security.ClientCredentials | None = None

    def __post_init__(self) -> None:
        self._channel = security.open_channel(self.address, self.credentials, CHANNEL_OPTIONS)
        self._stub = pb_grpc.ParameterServerStub(self._channel)  # type: ignore[no-untyped-call]
        self._payload = _PayloadCalls(self._channel)
        self._unary_limit = 0  # learnt at registration
        self._model_size: int | None = None

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def register(self, name: str, specs: codec.ModelSpec | None = None) -> Registration:
        """Registers `name`; with `specs` (the client's model: send them), the
        server refuses a model that is not its own before the client joins a
        cohort. Raises InvalidClientNameError, ModelMismatchError, CapacityError."""
        request = pb.RegisterClientRequest(client_name=name,
                                           tensors=codec.specs_to_proto(specs or ()))
        reply = self._call(lambda: self._stub.RegisterClient(request, timeout=self.timeout),
                           RETRYABLE_SHORT_CALLS)
        specs = codec.specs_from_proto(reply.tensors)
        self._unary_limit = 0 if self.streaming else reply.max_unary_payload
        self._model_size = codec.payload_size(specs)
        secagg = (secagg_codec.settings_from_proto(reply.secagg) if reply.HasField("secagg")
                  else None)
        return Registration(reply.client_id, reply.first_round, reply.model_round,
                            reply.total_rounds, specs, reply.assigns_rounds,
                            dict(reply.config), reply.strategy or "fedavg", secagg)

    def next_round(self, client_id: str, after_round: int,
                   timeout: float | None = None) -> codec.Plan:
        """What to do after having the global model of `after_round` (train,
        wait for a later round, or stop), waiting up to `timeout` for the next
        round to open. Raises WaitTimeoutError and what NextRound refuses with."""
        request = pb.NextRoundRequest(client_id=client_id, after_round=after_round)
        return self._wait(after_round + 1, lambda: codec.plan_from_proto(
            self._stub.NextRound(request, timeout=timeout or self.timeout)))

    def report_evaluation(self, client_id: str, round: int, num_examples: int,
                          metrics: Mapping[str, float]) -> bool:
        """Reports the evaluation of the global model of `round`; True if it
        counted. Raises EvaluationClosedError if it was not asked for."""
        report = codec.EvaluationReport(client_id, round, num_examples, dict(metrics))
        reply = self._call(lambda: self._stub.ReportEvaluation(
            codec.evaluation_report_to_proto(report), timeout=self.timeout),
            RETRYABLE_SHORT_CALLS)
        return bool(reply.counted)

    def send_update(self, client_id: str, round: int, state_dict: Mapping[str, torch.Tensor],
                    num_examples: int, metrics: Mapping[str, float] | None = None) -> Ack:
        """Uploads an update, retrying on UNAVAILABLE (safe: see module doc)."""
        views = codec.payload_views(state_dict)
        header = _update_header(client_id, round, state_dict, views, num_examples, metrics)
        if self._fits_unary(header.specs):
            message = wire.encode(codec.update_header_to_proto(header), views)
            reply = self._call(lambda: self._payload.send_update_unary(
                message, timeout=self.timeout), RETRYABLE_SHORT_CALLS)
        else:
            reply = self._call(lambda: self._payload.send_update(_with_crash_point(
                wire.stream(codec.update_header_to_proto(header), views, self.chunk_size),
                round), timeout=self.timeout), RETRYABLE_SHORT_CALLS)
        return Ack(reply.round, reply.duplicate, reply.received, reply.expected)

    def get_model(self, client_id: str, round: int, timeout: float | None = None,
                  ) -> tuple[codec.ModelHeader, dict[str, torch.Tensor]]:
        """The global model after `round`, waiting up to `timeout` for the round
        to close. Raises DecodeError/MalformedUpdateError if the stream is bad."""
        request = pb.GetAveragedModelRequest(client_id=client_id, round=round)
        if self._model_size is not None and self._model_size <= self._unary_limit:
            return self._wait(round, lambda: _model_from_message(
                self._payload.get_model_unary(request, timeout=timeout or self.timeout)))
        return self._wait(round, lambda: _receive_model(
            self._payload.get_model(request, timeout=timeout or self.timeout)))

    def exchange(self, client_id: str, round: int, state_dict: Mapping[str, torch.Tensor],
                 num_examples: int, metrics: Mapping[str, float] | None = None,
                 timeout: float | None = None,
                 ) -> tuple[codec.ModelHeader, dict[str, torch.Tensor]]:
        """send_update then get_model for `round`: in one call (ExchangeUnary)
        when the model fits the unary limit, else the two streaming calls.
        Retrying is safe (see module doc); waits up to `timeout` at the barrier."""
        if not self._fits_unary(codec.spec_of(state_dict)):
            self.send_update(client_id, round, state_dict, num_examples, metrics)
            return self.get_model(client_id, round, timeout)
        views = codec.payload_views(state_dict)
        header = _update_header(client_id, round, state_dict, views, num_examples, metrics)
        message = wire.encode(codec.update_header_to_proto(header), views)
        return self._wait(round, lambda: _model_from_message(
            self._payload.exchange(message, timeout=timeout or self.timeout)))

    def download_model(self, client_id: str, round: int, sink: Callable[[memoryview], object],
                       timeout: float | None = None) -> codec.ModelHeader:
        """Streams the global model after `round` into `sink`, chunk by chunk,
        in O(chunk) memory: for models too large to hold twice, or that go
        straight to a file. Every chunk is checked (length, finite values)
        before `sink` sees it; the SHA-256 only at the end, so on DecodeError or
        MalformedUpdateError the caller must throw away what `sink` received.
        Each chunk is a read-only view, valid for as long as it is kept.
        Retries only until the first chunk reached `sink`."""
        request = pb.GetAveragedModelRequest(client_id=client_id, round=round)
        delivered = False

        def receive() -> codec.ModelHeader:
            nonlocal delivered
            try:
                stream = iter(self._payload.get_model(request, timeout=timeout or self.timeout))
                header, checker = _start_model_stream(stream)
                for data in _model_chunks(stream):
                    checker.feed(data)
                    delivered = True
                    sink(data)
                checker.finish()
                return header
            except grpc.RpcError as error:
                if delivered:  # a retry would feed `sink` the same bytes twice
                    raise error_from_rpc(error) from None
                raise

        return self._call(receive)

    def secure_aggregation(self, requests: Iterator[pb.SecAggClientMessage],
                           timeout: float | None) -> SecureStream:
        """Opens a round's secure-aggregation stream (secagg_client.py drives
        it). Not retried: a broken stream means the round starts over."""
        return SecureStream(self._payload.secure(requests, timeout=timeout))

    def _fits_unary(self, specs: codec.ModelSpec) -> bool:
        return codec.payload_size(specs) <= self._unary_limit

    def _wait(self, round: int, call: Callable[[], T]) -> T:
        """A call that waits at the barrier: its deadline is the caller's limit
        on waiting (WaitTimeoutError), not a sign of a hung server."""
        try:
            return self._call(call)
        except RemoteError as error:
            if error.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise errors.WaitTimeoutError(round) from None
            raise

    def _call(self, call: Callable[[], T], retryable: frozenset[grpc.StatusCode] = RETRYABLE,
              ) -> T:
        policy = self.retry
        since = policy.now()  # when the server last answered, or the first attempt
        attempt = 0  # attempts that reached no server (a full disk's refusals do not count)
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                failure = error_from_rpc(error)
                alive = isinstance(failure, errors.StorageError)  # and asking us to wait
                if alive:
                    since = policy.now()
                else:
                    attempt += 1
                waited = policy.now() - since
                if (error.code() not in retryable or attempt >= policy.attempts
                        or (not alive and waited >= policy.give_up_after)):
                    raise failure from None
                delay = policy.backoff(attempt)
                if not alive:
                    delay = min(delay, policy.give_up_after - waited)
                log.warning("%s; retry in %.1f s", _one_line(failure), delay)
                policy.sleep(delay)


class SecureStream:
    """The server's side of a SecureAggregation stream, message by message,
    with failures as our errors."""

    def __init__(self, call: Iterator[pb.SecAggServerMessage]) -> None:
        self._call = call

    def next(self) -> pb.SecAggServerMessage | None:
        """The next message, None at the stream's end. Raises our error for
        the status the stream failed with."""
        try:
            return next(self._call, None)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[attr-defined]


def _one_line(error: errors.ParamServerError) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _update_header(client_id: str, round: int, state_dict: Mapping[str, torch.Tensor],
                   views: list[memoryview], num_examples: int,
                   metrics: Mapping[str, float] | None) -> codec.UpdateHeader:
    return codec.UpdateHeader(client_id, round, num_examples, codec.spec_of(state_dict),
                              codec.payload_digest(views), dict(metrics or {}))


class _PayloadCalls:
    """The calls that carry a payload, with `wire` (de)serializers instead of
    the generated ones: no protobuf copies of the payload."""

    def __init__(self, channel: grpc.Channel) -> None:
        model = wire.Decoder(pb.ModelMessage, pb.ModelHeader)
        chunk = wire.Decoder(pb.GetAveragedModelResponse, pb.ModelHeader)
        request = pb.GetAveragedModelRequest.SerializeToString
        ack = pb.SendUpdateResponse.FromString
        self.send_update = channel.stream_unary(
            wire.method_path("SendUpdate"), wire.encoded, ack)
        self.get_model = channel.unary_stream(
            wire.method_path("GetAveragedModel"), request, chunk)
        self.send_update_unary = channel.unary_unary(
            wire.method_path("SendUpdateUnary"), wire.encoded, ack)
        self.get_model_unary = channel.unary_unary(
            wire.method_path("GetAveragedModelUnary"), request, model)
        self.exchange = channel.unary_unary(wire.method_path("ExchangeUnary"), wire.encoded, model)
        self.secure = channel.stream_stream(
            wire.method_path("SecureAggregation"), pb.SecAggClientMessage.SerializeToString,
            pb.SecAggServerMessage.FromString)


def _with_crash_point(requests: Iterator[bytes], round: int) -> Iterator[bytes]:
    # A chaos test's client dies after the header and the first data chunk.
    if not faults.is_armed("client_during_upload", round):
        return requests
    return itertools.chain(itertools.islice(requests, 2), _crash_then(requests, round))


def _crash_then(requests: Iterator[bytes], round: int) -> Iterator[bytes]:
    time.sleep(0.2)  # let the first chunks reach the server
    faults.maybe_crash("client_during_upload", round)
    yield from requests


def _model_from_message(message: wire.Parts[pb.ModelHeader],
                        ) -> tuple[codec.ModelHeader, dict[str, torch.Tensor]]:
    header = _model_header(message, "a ModelMessage must carry a ModelHeader")
    data = message.data if message.data is not None else memoryview(b"")
    checker = codec.PayloadChecker(header.specs, header.sha256)
    checker.feed(data)
    checker.finish()
    return header, codec.state_dict_from_payload(header.specs, data)


def _receive_model(responses: Iterator[wire.Parts[pb.ModelHeader]],
                   ) -> tuple[codec.ModelHeader, dict[str, torch.Tensor]]:
    stream = iter(responses)
    header, checker = _start_model_stream(stream)
    payload = bytearray()
    for data in _model_chunks(stream):
        checker.feed(data)
        payload += data
    checker.finish()
    return header, codec.state_dict_from_payload(header.specs, payload, borrow=True)


def _start_model_stream(stream: Iterator[wire.Parts[pb.ModelHeader]],
                        ) -> tuple[codec.ModelHeader, codec.PayloadChecker]:
    header = _model_header(next(stream, wire.Parts()),
                           "a GetAveragedModel stream must start with a ModelHeader")
    return header, codec.PayloadChecker(header.specs, header.sha256)


def _model_header(message: wire.Parts[pb.ModelHeader], missing: str) -> codec.ModelHeader:
    if message.error is not None:
        raise errors.DecodeError(message.error)
    if message.header is None:
        raise errors.DecodeError(missing)
    return codec.model_header_from_proto(message.header)


def _model_chunks(stream: Iterator[wire.Parts[pb.ModelHeader]]) -> Iterator[memoryview]:
    for response in stream:
        if response.error is not None:
            raise errors.DecodeError(response.error)
        if response.header is not None:
            raise errors.DecodeError("ModelHeader sent twice in one stream")
        if response.data is None:
            raise errors.DecodeError("empty GetAveragedModelResponse where a chunk was expected")
        yield response.data


def error_from_rpc(error: grpc.RpcError) -> errors.ParamServerError:
    """Our error for a failed call: the exact class the server raised when the
    status carries its ErrorInfo, else the class the status code maps to."""
    code, message = error.code(), error.details() or ""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason in _ERRORS_BY_NAME:
            return _rebuild(_ERRORS_BY_NAME[info.reason], message, dict(info.metadata))
    cls = ERROR_BY_STATUS.get(code)
    if cls is None:
        return RemoteError(code, message)
    return _rebuild(cls, message, {})


def _rebuild(cls: type[errors.ParamServerError], message: str,
             fields: dict[str, str]) -> errors.ParamServerError:
    # Our errors' constructors format their own messages; here the message
    # already exists, so set it and the fields directly (as unpickling does).
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    for key, value in fields.items():
        setattr(error, key, int(value) if value.isdigit() else value)
    return error
