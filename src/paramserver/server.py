"""The gRPC transport of the server: the servicer, create_server() and the
server's lifecycle (health, keepalive, graceful stop).

Thin on purpose: the round machine (rounds.py) decides, the coordinator owns
the lock, the waiting and the disk; this module decodes requests, delegates,
encodes replies, and holds the one table that maps our errors to gRPC status
codes (with a google.rpc.ErrorInfo naming the error class and its fields).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from paramserver import codec, secagg_codec, security, wire
from paramserver.clock import Clock
from paramserver.config import ServerConfig, TlsConfig
from paramserver.coordinator import Coordinator, GlobalModel
from paramserver.errors import (
    AveragingError,
    CallEndedError,
    CapacityError,
    ConflictingUpdateError,
    CredentialsUnavailableError,
    DecodeError,
    InvalidClientNameError,
    LimitExceededError,
    MalformedUpdateError,
    ModelMismatchError,
    ParamServerError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RoundAbortedError,
    RoundError,
    SecAggAbortedError,
    SecAggError,
    ShuttingDownError,
    StorageError,
    UnauthenticatedError,
    UnknownClientError,
    WaitTimeoutError,
)
from paramserver.rounds import Accepted
from paramserver.secagg_server import SecAggOrderError, SecureRounds
from paramserver.spool import SpooledUpdate
from paramserver.v1 import parameter_server_pb2 as pb
from paramserver.v1 import parameter_server_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver.server")

M = TypeVar("M")

SERVICE_NAME = wire.SERVICE.full_name
ERROR_DOMAIN = "paramserver"

# The one table from our errors to status codes. Looked up along the MRO, so a
# subclass maps like its base unless it has its own row. The client inverts it.
STATUS_BY_ERROR: dict[type[ParamServerError], grpc.StatusCode] = {
    MalformedUpdateError: grpc.StatusCode.INVALID_ARGUMENT,
    DecodeError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidClientNameError: grpc.StatusCode.INVALID_ARGUMENT,
    AveragingError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownClientError: grpc.StatusCode.NOT_FOUND,
    RoundError: grpc.StatusCode.FAILED_PRECONDITION,
    ConflictingUpdateError: grpc.StatusCode.ALREADY_EXISTS,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PayloadTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RoundAbortedError: grpc.StatusCode.ABORTED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    StorageError: grpc.StatusCode.UNAVAILABLE,
    CredentialsUnavailableError: grpc.StatusCode.UNAVAILABLE,
    CallEndedError: grpc.StatusCode.CANCELLED,
    WaitTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SecAggError: grpc.StatusCode.INVALID_ARGUMENT,
    SecAggAbortedError: grpc.StatusCode.ABORTED,
    SecAggOrderError: grpc.StatusCode.FAILED_PRECONDITION,
}

# Every status a handler sends stays far below gRPC's 8 KiB metadata limit
# (the message travels twice: as grpc-message and inside the Status details),
# so that the client sees the refusal, not RESOURCE_EXHAUSTED about metadata.
MAX_STATUS_MESSAGE = 1024
MAX_DETAIL_VALUE = 128

def status_code_for(error: ParamServerError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _error_details(error: ParamServerError) -> dict[str, str]:
    keys = ("client_id", "round", "open_round", "tensor", "capacity", "name", "size", "limit",
            "errno")
    return {k: _bounded(str(getattr(error, k)), MAX_DETAIL_VALUE)
            for k in keys if getattr(error, k, None) is not None}


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text)} chars)"


def _abort(context: grpc.ServicerContext, error: ParamServerError) -> NoReturn:
    code = status_code_for(error)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(
        reason=type(error).__name__, domain=ERROR_DOMAIN, metadata=_error_details(error)))
    status = status_pb2.Status(code=code.value[0],
                               message=_bounded(str(error), MAX_STATUS_MESSAGE), details=[info])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


@contextlib.contextmanager
def _status_from_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    try:
        yield
    except ParamServerError as error:
        # Refusals of callers without credentials (or past a limit) are many
        # and cheap to send: at INFO they would let anyone fill the log.
        quiet = isinstance(error, UnauthenticatedError | LimitExceededError)
        log.log(logging.DEBUG if quiet else logging.INFO, "%s refused: %s", rpc, error)
        _abort(context, error)
    except Exception as error:
        if not context.is_active():  # the client went away mid-call; nothing to answer
            log.info("%s: client gone (%s)", rpc, error)
            raise
        log.exception("%s failed", rpc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(error).__name__}")


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """paramserver.v1.ParameterServer over a Coordinator: decode, delegate, encode."""

    def __init__(self, coordinator: Coordinator, chunk_size: int,
                 config: ServerConfig) -> None:
        self._coordinator = coordinator
        self._chunk_size = chunk_size
        self._config = config
        # The last ModelMessage encoded, for the model it was encoded from:
        # every client of a round asks for the same one (a copy of the payload
        # and a header conversion each, otherwise).
        self._last_message: tuple[GlobalModel, bytes] | None = None

    def RegisterClient(self, request: pb.RegisterClientRequest | wire.Unparseable,
                       context: grpc.ServicerContext) -> pb.RegisterClientResponse:
        with _status_from_errors(context, "RegisterClient"):
            request = _parsed(request)
            reg = self._coordinator.register(request.client_name, self._client_model(request))
            config = self._config
            return pb.RegisterClientResponse(
                client_id=reg.client_id, first_round=reg.first_round,
                model_round=reg.model_round, max_unary_payload=codec.MAX_CHUNK_SIZE,
                total_rounds=config.total_rounds, clients=config.clients,
                min_clients=config.min_clients, round_timeout=config.round_timeout or 0.0,
                tensors=codec.specs_to_proto(self._coordinator.specs),
                assigns_rounds=config.assigns_rounds,
                config=dict(config.strategy.round_config(reg.first_round)),
                strategy=config.strategy.name,
                secagg=None if config.secagg is None else secagg_codec.settings_to_proto(
                    config.secagg.quantization, config.secagg.neighbours))

    def SendUpdate(self, request_iterator: Iterator[wire.Parts[pb.UpdateHeader]],
                   context: grpc.ServicerContext) -> pb.SendUpdateResponse:
        with _status_from_errors(context, "SendUpdate"):
            header = self._header(_first_header(request_iterator))
            return _ack(self._coordinator.submit(header, _data_chunks(request_iterator),
                                                 _call_alive(context)))

    def GetAveragedModel(self, request: pb.GetAveragedModelRequest | wire.Unparseable,
                         context: grpc.ServicerContext) -> Iterator[bytes]:
        with _status_from_errors(context, "GetAveragedModel"):
            request = _parsed(request)
            model = self._wait(request.client_id, request.round, context)
        yield from wire.stream(codec.model_header_to_proto(model.header), [model.payload],
                               self._chunk_size)
        self._coordinator.fetched(request.client_id, request.round)

    def SendUpdateUnary(self, request: wire.Parts[pb.UpdateHeader],
                        context: grpc.ServicerContext) -> pb.SendUpdateResponse:
        with _status_from_errors(context, "SendUpdateUnary"):
            header, data = self._unary_update(request)
            return _ack(self._coordinator.submit(header, [data], _call_alive(context)))

    def GetAveragedModelUnary(self, request: pb.GetAveragedModelRequest | wire.Unparseable,
                              context: grpc.ServicerContext) -> bytes:
        with _status_from_errors(context, "GetAveragedModelUnary"):
            request = _parsed(request)
            _check_unary_size(codec.payload_size(self._coordinator.specs))
            model = self._wait(request.client_id, request.round, context)
        return self._model_message(model, request.client_id, request.round)

    def ExchangeUnary(self, request: wire.Parts[pb.UpdateHeader],
                      context: grpc.ServicerContext) -> bytes:
        with _status_from_errors(context, "ExchangeUnary"):
            header, data = self._unary_update(request)
            accepted = self._coordinator.submit(header, [data], _call_alive(context))
            model = self._wait(header.client_id, accepted.round, context)
        return self._model_message(model, header.client_id, accepted.round)

    def NextRound(self, request: pb.NextRoundRequest | wire.Unparseable,
                  context: grpc.ServicerContext) -> pb.RoundAssignment:
        with _status_from_errors(context, "NextRound"):
            request = _parsed(request)
            context.add_callback(self._coordinator.wake)  # a call that ends frees its wait
            plan = self._coordinator.next_round(request.client_id, request.after_round,
                                                context.time_remaining, context.is_active)
            if plan is None:
                raise WaitTimeoutError(request.after_round + 1)
            return codec.plan_to_proto(plan)

    def ReportEvaluation(self, request: pb.EvaluationReport | wire.Unparseable,
                         context: grpc.ServicerContext) -> pb.EvaluationAck:
        with _status_from_errors(context, "ReportEvaluation"):
            report = codec.evaluation_report_from_proto(_parsed(request))
            counted = self._coordinator.report_evaluation(
                report.client_id, report.round, report.num_examples, report.metrics)
            return pb.EvaluationAck(counted=counted)

    def SecureAggregation(self, requests: Iterator[pb.SecAggClientMessage | wire.Unparseable],
                          context: grpc.ServicerContext) -> Iterator[pb.SecAggServerMessage]:
        rpc = "SecureAggregation"
        with _status_from_errors(context, rpc):
            first = _step(requests, "advertise").advertise
            secure = self._secure_rounds()
            context.add_callback(secure.wake)  # a stream that ends frees its stage
            client, round, advert = secagg_codec.advert_from_proto(first)
            cohort = self._coordinator.secure_cohort(client, round)
            secure.advertise(round, cohort, client, advert)
        alive = context.is_active
        try:
            with _status_from_errors(context, rpc), self._withdrawn_on_abort(round, cohort):
                roster = secure.roster(round, client, alive)
            yield pb.SecAggServerMessage(roster=secagg_codec.roster_to_proto(roster))
            with _status_from_errors(context, rpc), self._withdrawn_on_abort(round, cohort):
                shares = _step(requests, "shares").shares
                secure.share(round, client, secagg_codec.boxes_from_proto(shares.ciphertexts))
                delivered = secure.delivered(round, client, alive)
            # Who did not share keys cannot send a masked update: the barrier
            # stops waiting for them now rather than at the deadline.
            self._coordinator.withdraw(round, cohort - secure.senders(round))
            yield pb.SecAggServerMessage(delivered=pb.SecAggDelivered(ciphertexts=delivered))
            with _status_from_errors(context, rpc):
                survivors = secure.survivors(round, client, alive)
            yield pb.SecAggServerMessage(survivors=secagg_codec.names_to_proto(survivors))
            if client not in survivors:
                return  # its masked update did not make the round
            with _status_from_errors(context, rpc):
                _step(requests, "confirm")
                secure.confirm(round, client)
                included, dropped = secure.included(round, client, alive)
            yield pb.SecAggServerMessage(included=secagg_codec.included_to_proto(included,
                                                                                 dropped))
            with _status_from_errors(context, rpc):
                reveal = secagg_codec.reveal_from_proto(_step(requests, "reveal").reveal)
                secure.reveal(round, client, reveal)
                updates, total = secure.done(round, client, alive)
            yield pb.SecAggServerMessage(done=pb.SecAggDone(num_updates=updates,
                                                             total_examples=total))
        finally:
            secure.left(round, client)

    @contextlib.contextmanager
    def _withdrawn_on_abort(self, round: int, cohort: frozenset[str]) -> Iterator[None]:
        """A secure round that aborts during its key exchange takes the
        round with it: nobody can send a masked update for it."""
        try:
            yield
        except SecAggAbortedError:
            self._coordinator.withdraw(round, cohort)
            raise

    def _secure_rounds(self) -> SecureRounds:
        secure = self._coordinator.secure
        if secure is None:
            raise SecAggOrderError("this server does not run secure aggregation "
                                   "(serve --secagg)")
        return secure

    def _wait(self, client_id: str, round: int, context: grpc.ServicerContext) -> GlobalModel:
        """The model of `round`, waiting at the barrier while the call lives.
        Raises WaitTimeoutError when the call's deadline passes first."""
        context.add_callback(self._coordinator.wake)  # a call that ends frees its slot
        model = self._coordinator.wait_for_model(client_id, round, context.time_remaining,
                                                 context.is_active)
        if model is None:
            raise WaitTimeoutError(round)
        return model

    def _client_model(self, request: pb.RegisterClientRequest) -> codec.ModelSpec | None:
        """The client's model, if it sent its specs (optional), checked for
        their count before any is decoded; the coordinator compares them."""
        if not request.tensors:
            return None
        try:
            codec.check_spec_count(request.tensors, self._coordinator.specs)
        except MalformedUpdateError as error:
            raise ModelMismatchError(f"the client's model is not the server's: {error}") from None
        return codec.specs_from_proto(request.tensors)

    def _header(self, message: pb.UpdateHeader) -> codec.UpdateHeader:
        # The spec count first: 100,000 specs are refused before any is decoded.
        return codec.update_header_from_proto(message, self._coordinator.update_specs)

    def _unary_update(self, request: wire.Parts[pb.UpdateHeader],
                      ) -> tuple[codec.UpdateHeader, memoryview]:
        if request.error is not None:
            raise DecodeError(request.error)
        if request.header is None:
            raise DecodeError("the UpdateMessage has no header: field 1 (UpdateHeader) "
                              "must be set")
        header = self._header(request.header)
        data = request.data if request.data is not None else memoryview(b"")
        _check_unary_size(len(data))
        return header, data

    def _model_message(self, model: GlobalModel, client_id: str, round: int) -> bytes:
        # The reply is handed to gRPC on return: the model counts as fetched
        # (a stop lets it finish within its grace).
        self._coordinator.fetched(client_id, round)
        cached = self._last_message  # one read: other threads may replace it
        if cached is not None and cached[0] is model:
            return cached[1]
        message = wire.encode(codec.model_header_to_proto(model.header), [model.payload])
        self._last_message = (model, message)
        return message


def _step(requests: Iterator[pb.SecAggClientMessage | wire.Unparseable],
          step: str) -> pb.SecAggClientMessage:
    """The next message of a secure-aggregation stream, which must be `step`."""
    message = next(requests, None)
    if isinstance(message, wire.Unparseable):
        raise DecodeError(message.error)
    if message is None:
        raise SecAggOrderError(f"the stream ended where a {step} message was due")
    if message.WhichOneof("step") != step:
        raise SecAggOrderError(f"a {message.WhichOneof('step') or 'empty'} message where a "
                               f"{step} message was due")
    return message


def _ack(accepted: Accepted[SpooledUpdate]) -> pb.SendUpdateResponse:
    return pb.SendUpdateResponse(round=accepted.round, duplicate=accepted.duplicate,
                                 received=accepted.received, expected=accepted.expected)


def _check_unary_size(size: int) -> None:
    if size > codec.MAX_CHUNK_SIZE:
        raise PayloadTooLargeError(size, codec.MAX_CHUNK_SIZE)


def _parsed(request: M | wire.Unparseable) -> M:
    if isinstance(request, wire.Unparseable):
        raise DecodeError(request.error)
    return request


# An upload is committed only with at least this much of its deadline left: the
# client's deadline may pass a moment before the server's (which starts when
# the call arrives), and an ack that cannot arrive in time must not exist.
COMMIT_MARGIN = 0.05


def _call_alive(context: grpc.ServicerContext) -> Callable[[], bool]:
    """Whether the call can still be answered: not cancelled, not (about to
    be) past its deadline. Asked at the last moment before an update is
    committed. gRPC learns of a cancellation asynchronously, so a cancel that
    reaches the server after this check cannot undo the commit: the .proto
    says what a client may assume."""

    def alive() -> bool:
        remaining = context.time_remaining()
        return context.is_active() and (remaining is None or remaining > COMMIT_MARGIN)

    return alive


def _first_header(requests: Iterator[wire.Parts[pb.UpdateHeader]]) -> pb.UpdateHeader:
    first = next(requests, None)
    if first is not None and first.error is not None:
        raise DecodeError(first.error)
    if first is None or first.header is None:
        raise DecodeError("a SendUpdate stream must start with an UpdateHeader")
    return first.header


def _data_chunks(requests: Iterator[wire.Parts[pb.UpdateHeader]]) -> Iterator[memoryview]:
    for request in requests:
        if request.error is not None:
            raise DecodeError(request.error)
        if request.header is not None:
            raise DecodeError("UpdateHeader sent twice in one SendUpdate stream")
        if request.data is None:
            raise DecodeError("empty SendUpdateRequest where a data chunk was expected")
        yield request.data


class _Guard:
    """Around every handler of the service (health is registered apart and
    stays open): who is calling (security.Authenticator), whether the request
    acts for that caller, and the per-caller limits. A refusal happens before
    the handler decodes anything but the client name, so it changes nothing."""

    def __init__(self, authenticator: security.Authenticator, counter: security.CallCounter,
                 watchdog: security.StreamWatchdog) -> None:
        self.authenticator = authenticator
        self.counter = counter
        self.watchdog = watchdog

    def _admit(self, context: grpc.ServicerContext, rpc: str, upload: bool) -> str | None:
        with _status_from_errors(context, rpc):
            principal = self.authenticator.principal(context.invocation_metadata(),
                                                     context.auth_context())
            self.counter.enter(principal, rpc, upload)
            return principal

    def unary(self, rpc: str, behavior: Callable[[Any, grpc.ServicerContext], M],
              ) -> Callable[[Any, grpc.ServicerContext], M]:
        def handle(request: Any, context: grpc.ServicerContext) -> M:
            principal = self._admit(context, rpc, upload=False)
            try:
                with _status_from_errors(context, rpc):
                    security.check_identity(principal, security.claimed_name(request))
                return behavior(request, context)
            finally:
                self.counter.exit(principal, upload=False)

        return handle

    def stream_out(self, rpc: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[M]],
                   ) -> Callable[[Any, grpc.ServicerContext], Iterator[M]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[M]:
            principal = self._admit(context, rpc, upload=False)
            try:
                with _status_from_errors(context, rpc):
                    security.check_identity(principal, security.claimed_name(request))
                yield from behavior(request, context)
            finally:
                self.counter.exit(principal, upload=False)

        return handle

    def stream_in(self, rpc: str, behavior: Callable[[Iterator[Any], grpc.ServicerContext], M],
                  ) -> Callable[[Iterator[Any], grpc.ServicerContext], M]:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> M:
            principal = self._admit(context, rpc, upload=True)
            watch = self.watchdog.watch(context.cancel)
            try:
                return behavior(_checked_stream(requests, principal, watch), context)
            finally:
                watch.close()
                self.counter.exit(principal, upload=True)

        return handle

    def stream_both(self, rpc: str,
                    behavior: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[M]],
                    ) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[M]]:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[M]:
            principal = self._admit(context, rpc, upload=True)
            watch = self.watchdog.watch(context.cancel)
            try:
                yield from behavior(_first_checked(requests, principal, watch), context)
            finally:
                watch.close()
                self.counter.exit(principal, upload=True)

        return handle


def _first_checked(requests: Iterator[Any], principal: str | None,
                   watch: security.Watch) -> Iterator[Any]:
    """A long-lived stream's messages: only the first one is due promptly
    (the idle watch ends with it), and it must name the caller."""
    first = True
    for request in requests:
        if first:
            watch.close()
            security.check_identity(principal, security.claimed_name(request))
            first = False
        yield request


def _checked_stream(requests: Iterator[Any], principal: str | None,
                    watch: security.Watch) -> Iterator[Any]:
    """The stream's messages, each one resetting the idle watch; the first
    one (the header) checked against the caller's identity."""
    first = True
    for request in requests:
        watch.touch()
        if first:
            security.check_identity(principal, security.claimed_name(request))
            first = False
        yield request


def _method_handlers(servicer: ParameterServerServicer, guard: _Guard,
                     ) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's handlers: the generated ones but for the payload-carrying
    messages, which go through `wire` (no protobuf copies of the payload);
    each behind the guard."""
    update = wire.Decoder(pb.UpdateMessage, pb.UpdateHeader)
    chunk = wire.Decoder(pb.SendUpdateRequest, pb.UpdateHeader)
    # No deserializer may raise (gRPC would answer INTERNAL): unparseable
    # bytes reach the handler, which refuses them with INVALID_ARGUMENT.
    register = wire.lenient(pb.RegisterClientRequest)
    model_request = wire.lenient(pb.GetAveragedModelRequest)
    next_round = wire.lenient(pb.NextRoundRequest)
    report = wire.lenient(pb.EvaluationReport)
    secure = wire.lenient(pb.SecAggClientMessage)
    unary, stream_in, stream_out = guard.unary, guard.stream_in, guard.stream_out
    return {
        "RegisterClient": grpc.unary_unary_rpc_method_handler(
            unary("RegisterClient", servicer.RegisterClient), register,
            pb.RegisterClientResponse.SerializeToString),
        "SendUpdate": grpc.stream_unary_rpc_method_handler(
            stream_in("SendUpdate", servicer.SendUpdate), chunk,
            pb.SendUpdateResponse.SerializeToString),
        "GetAveragedModel": grpc.unary_stream_rpc_method_handler(
            stream_out("GetAveragedModel", servicer.GetAveragedModel), model_request,
            wire.encoded),
        "SendUpdateUnary": grpc.unary_unary_rpc_method_handler(
            unary("SendUpdateUnary", servicer.SendUpdateUnary), update,
            pb.SendUpdateResponse.SerializeToString),
        "GetAveragedModelUnary": grpc.unary_unary_rpc_method_handler(
            unary("GetAveragedModelUnary", servicer.GetAveragedModelUnary), model_request,
            wire.encoded),
        "ExchangeUnary": grpc.unary_unary_rpc_method_handler(
            unary("ExchangeUnary", servicer.ExchangeUnary), update, wire.encoded),
        "NextRound": grpc.unary_unary_rpc_method_handler(
            unary("NextRound", servicer.NextRound), next_round,
            pb.RoundAssignment.SerializeToString),
        "ReportEvaluation": grpc.unary_unary_rpc_method_handler(
            unary("ReportEvaluation", servicer.ReportEvaluation), report,
            pb.EvaluationAck.SerializeToString),
        "SecureAggregation": grpc.stream_stream_rpc_method_handler(
            guard.stream_both("SecureAggregation", servicer.SecureAggregation), secure,
            pb.SecAggServerMessage.SerializeToString),
    }


# Keepalive: notice a silently dead peer within about half a minute, and let
# clients that wait long at the barrier ping without being cut off.
# No BDP probing: it grows every stream's receive window so that gRPC buffers
# tens of MB per concurrent upload ahead of the handler; with it, server RSS
# for a 100 MB model went from 0.67 GB at 4 clients to 3.3 GB at 64 (0.55 GB
# and 0.63 GB without, at the same speed on loopback; docs/benchmarks.md).
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    coordinator: Coordinator
    health: health.HealthServicer
    executor: concurrent.futures.ThreadPoolExecutor
    watchdog: security.StreamWatchdog
    authentication: str = "none"

    def stop(self, grace: float | None = 5.0) -> None:
        """Graceful: health goes NOT_SERVING, waiters are released with
        UNAVAILABLE, new calls get UNAVAILABLE, in-flight calls get `grace`
        seconds, a running aggregation finishes and is written, and only then
        is the state dir released (another server may take it from there)."""
        self.health.enter_graceful_shutdown()
        self.coordinator.shutdown()
        self.server.stop(grace).wait()
        # Let every handler thread return before the caller exits: a handler
        # still inside gRPC while the interpreter finalizes can abort the
        # process ("terminate called without an active exception", seen once
        # in the SIGTERM chaos test).
        self.executor.shutdown(wait=True)
        self.watchdog.stop()
        self.coordinator.close()


class BindError(OSError):
    """The server cannot listen on its address (in use, or not ours)."""


def create_server(config: ServerConfig, initial_model: Mapping[str, torch.Tensor],
                  address: str = "127.0.0.1:0", clock: Clock | None = None) -> RunningServer:
    """Builds and starts a server bound to `address` (port 0 picks a free port),
    resuming from `config.state_dir` if it holds an earlier run. Raises
    BindError if it cannot listen there, StateDirError if the state dir cannot
    be used; either way nothing is left running or locked.

    Every client may hold one call waiting at the barrier (the coordinator caps
    waiters at `capacity`) and uploads are capped at `config.limits.uploads`,
    so the pool has a thread for each of those plus room for short calls
    (registration, health) that neither can crowd out."""
    health_servicer = health.HealthServicer()
    config = dataclasses.replace(config, on_storage=_storage_to_health(
        health_servicer, config.on_storage))
    coordinator = Coordinator(config, initial_model, clock)
    workers = config.capacity + config.limits.uploads + 32
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="rpc")
    watchdog = security.StreamWatchdog(config.limits.idle_timeout, clock)
    try:
        authenticator = security.authenticator_for(
            config.tls is not None and config.tls.client_ca is not None, config.state_dir)
        guard = _Guard(authenticator, security.CallCounter(config.limits), watchdog)
        server = grpc.server(executor, maximum_concurrent_rpcs=workers * 2,
                             options=SERVER_OPTIONS)
        handlers = _method_handlers(ParameterServerServicer(coordinator, config.chunk_size,
                                                            config), guard)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = _bind(server, address, config.tls)
        server.start()
    except BaseException:
        executor.shutdown(wait=False)
        watchdog.stop()
        coordinator.close()
        raise
    serving = (health_pb2.HealthCheckResponse.SERVING if coordinator.storage_ok
               else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, serving)
    return RunningServer(server, port, coordinator, health_servicer, executor, watchdog,
                         authenticator.name)


def _bind(server: grpc.Server, address: str, tls: TlsConfig | None) -> int:
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, security.server_credentials(
                tls.cert, tls.key, tls.client_ca))
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise BindError(f"cannot listen on {address}: the address is in use or not this "
                        "machine's")
    return port


def _storage_to_health(servicer: health.HealthServicer,
                       then: Callable[[bool], None] | None) -> Callable[[bool], None]:
    """Health follows the state dir: NOT_SERVING while it refuses writes."""

    def on_storage(ok: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            servicer.set(name, status)
        if then is not None:
            then(ok)

    return on_storage
