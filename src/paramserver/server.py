"""The gRPC transport of the server: servicer, create_server() and serve().

Thin on purpose: the round machine (rounds.py) decides, the spool and the
averaging compute; this module owns the one lock, the waiting, the threads,
and the one table that maps our errors to gRPC status codes.

Locking: `self._cond` guards the round machine and the published global model.
It is never held during network or disk transfers of a payload, only while the
machine decides and while a committed file is renamed into place, so one slow
client never stalls the others. Waiters at the barrier sleep on the condition
(no polling) and are woken when a global model is published.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from paramserver import codec
from paramserver.averaging import average_metrics, validate_state_dict, weight_fractions
from paramserver.errors import (
    AveragingError,
    CapacityError,
    ConflictingUpdateError,
    DecodeError,
    InvalidClientNameError,
    MalformedUpdateError,
    ParamServerError,
    RoundAbortedError,
    RoundError,
    UnknownClientError,
)
from paramserver.rounds import Accepted, ModelStatus, RoundMachine
from paramserver.spool import Spool, SpooledUpdate, aggregate
from paramserver.v1 import parameter_server_pb2 as pb
from paramserver.v1 import parameter_server_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver.server")

SERVICE_NAME = "paramserver.v1.ParameterServer"
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
    RoundAbortedError: grpc.StatusCode.ABORTED,
}

Evaluator = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]


def status_code_for(error: ParamServerError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _error_details(error: ParamServerError) -> dict[str, str]:
    keys = ("client_id", "round", "open_round", "tensor", "capacity", "name")
    return {k: str(getattr(error, k)) for k in keys if getattr(error, k, None) is not None}


def _abort(context: grpc.ServicerContext, error: ParamServerError) -> NoReturn:
    code = status_code_for(error)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(
        reason=type(error).__name__, domain=ERROR_DOMAIN, metadata=_error_details(error)))
    status = status_pb2.Status(code=code.value[0], message=str(error), details=[info])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


@contextlib.contextmanager
def _status_from_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    try:
        yield
    except ParamServerError as error:
        log.info("%s refused: %s", rpc, error)
        _abort(context, error)
    except Exception as error:
        if not context.is_active():  # the client went away mid-call; nothing to answer
            log.info("%s: client gone (%s)", rpc, error)
            raise
        log.exception("%s failed", rpc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(error).__name__}")


@dataclass(frozen=True)
class GlobalModel:
    """A published global model: immutable, so it is served without the lock."""

    header: codec.ModelHeader
    payload: bytes | bytearray


@dataclass(frozen=True)
class ReceivedUpdate:
    spooled: SpooledUpdate
    metrics: Mapping[str, float]


@dataclass
class ServerConfig:
    min_clients: int = 2
    total_rounds: int = 0
    capacity: int = 256
    chunk_size: int = codec.DEFAULT_CHUNK_SIZE
    spool_dir: Path | None = None
    durable: bool = False
    round_log: Path | None = None  # JSON lines, one per published round
    evaluator: Evaluator | None = field(default=None, repr=False)


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """Implements paramserver.v1.ParameterServer over a RoundMachine."""

    def __init__(self, config: ServerConfig, initial_model: Mapping[str, torch.Tensor],
                 spool: Spool, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._spool = spool
        self._clock = clock
        self._cond = threading.Condition()
        self._machine: RoundMachine[ReceivedUpdate] = RoundMachine(
            min_clients=config.min_clients, total_rounds=config.total_rounds,
            capacity=config.capacity)
        self.specs = codec.spec_of(initial_model)
        validate_state_dict(initial_model, self.specs)
        views = codec.payload_views(initial_model)
        payload = b"".join(views)
        self._model = GlobalModel(
            codec.ModelHeader(0, self.specs, hashlib.sha256(payload).digest()), payload)
        self.round_log: list[codec.ModelHeader] = [self._model.header]

    # -- RPCs -----------------------------------------------------------------

    def RegisterClient(self, request: pb.RegisterClientRequest,
                       context: grpc.ServicerContext) -> pb.RegisterClientResponse:
        with _status_from_errors(context, "RegisterClient"), self._cond:
            reg = self._machine.register(request.client_name, self._clock())
            if reg.is_new:
                log.info("client %s registered, first round %d", reg.client_id, reg.first_round)
            return pb.RegisterClientResponse(
                client_id=reg.client_id, first_round=reg.first_round,
                total_rounds=self._config.total_rounds, min_clients=self._config.min_clients,
                tensors=codec.specs_to_proto(self.specs))

    def SendUpdate(self, request_iterator: Iterator[pb.SendUpdateRequest],
                   context: grpc.ServicerContext) -> pb.SendUpdateResponse:
        with _status_from_errors(context, "SendUpdate"):
            header = self._read_header(request_iterator)
            with self._cond:
                duplicate = self._machine.check_submit(header.client_id, header.round,
                                                       header.sha256)
            if duplicate is not None:  # an idempotent retry: no need to read the payload
                return _ack(duplicate)
            codec.check_specs_match(header.specs, self.specs)
            accepted = self._receive(header, request_iterator)
            if accepted.closed is not None:
                threading.Thread(target=self._aggregate, args=(accepted,),
                                 name=f"aggregate-{accepted.round}", daemon=True).start()
            return _ack(accepted)

    def GetAveragedModel(self, request: pb.GetAveragedModelRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.GetAveragedModelResponse]:
        with _status_from_errors(context, "GetAveragedModel"):
            model = self._wait_for_model(request.client_id, request.round, context)
        if model is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"round {request.round} did not close before the deadline")
        yield from codec.model_responses(model.header, [model.payload], self._config.chunk_size)

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _read_header(requests: Iterator[pb.SendUpdateRequest]) -> codec.UpdateHeader:
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise DecodeError("a SendUpdate stream must start with an UpdateHeader")
        return codec.update_header_from_proto(first.header)

    def _receive(self, header: codec.UpdateHeader,
                 requests: Iterator[pb.SendUpdateRequest]) -> Accepted[ReceivedUpdate]:
        checker = codec.PayloadChecker(header.specs, header.sha256)
        writer = self._spool.writer(header.round, header.client_id)
        try:
            for request in requests:
                part = request.WhichOneof("part")
                if part == "header":
                    raise DecodeError("UpdateHeader sent twice in one SendUpdate stream")
                if part != "data":
                    raise DecodeError("empty SendUpdateRequest where a data chunk was expected")
                checker.feed(request.data)
                writer.write(request.data)
            checker.finish()
            writer.seal()
            # Re-decide under the lock: the round may have moved on, or another
            # upload from this client may have landed while we were receiving.
            with self._cond:
                accepted = self._machine.check_submit(header.client_id, header.round,
                                                      header.sha256)
                if accepted is not None:
                    writer.discard()
                    return accepted
                update = ReceivedUpdate(
                    SpooledUpdate(writer.commit(), header.num_examples), header.metrics)
                return self._machine.submit(header.client_id, header.round, header.sha256,
                                            update)
        finally:
            writer.discard()  # no-op after commit

    def _wait_for_model(self, client_id: str, round: int,
                        context: grpc.ServicerContext) -> GlobalModel | None:
        """The global model after `round`, or None if the deadline passed first."""
        with self._cond:
            while self._machine.model_status(client_id, round) is ModelStatus.PENDING:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(timeout=remaining)
            return self._model

    def _aggregate(self, accepted: Accepted[ReceivedUpdate]) -> None:
        assert accepted.closed is not None
        updates = [u.payload for u in accepted.closed]
        started = time.perf_counter()
        opened_at = self._machine.opened_at  # stable: the round cannot reopen before publish
        payload = aggregate(self.specs, [u.spooled for u in updates])
        fractions = weight_fractions([u.spooled.num_examples for u in updates])
        metrics = average_metrics(fractions, [u.metrics for u in updates])
        if self._config.evaluator is not None:
            model = codec.state_dict_from_payload(self.specs, payload)
            metrics.update({f"eval_{k}": v for k, v in self._config.evaluator(model).items()})
        header = codec.ModelHeader(
            round=accepted.round, specs=self.specs, sha256=hashlib.sha256(payload).digest(),
            num_updates=len(updates), total_examples=sum(u.spooled.num_examples for u in updates),
            metrics=metrics)
        with self._cond:
            self._model = GlobalModel(header, payload)
            self.round_log.append(header)
            self._machine.published(accepted.round, self._clock())
            self._cond.notify_all()
        self._spool.drop_round(accepted.round)
        record = {
            "round": header.round, "num_updates": header.num_updates,
            "total_examples": header.total_examples, "metrics": metrics,
            "sha256": header.sha256.hex(),
            "aggregation_seconds": time.perf_counter() - started,
            "round_seconds": self._clock() - opened_at if opened_at is not None else None,
        }
        log.info("round %d closed: %s", header.round, json.dumps(record))
        if self._config.round_log is not None:
            with open(self._config.round_log, "a") as f:
                f.write(json.dumps(record) + "\n")


def _ack(accepted: Accepted[ReceivedUpdate]) -> pb.SendUpdateResponse:
    return pb.SendUpdateResponse(round=accepted.round, duplicate=accepted.duplicate,
                                 received=accepted.received, expected=accepted.expected)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: ParameterServerServicer
    health: health.HealthServicer

    def stop(self, grace: float | None = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(config: ServerConfig, initial_model: Mapping[str, torch.Tensor],
                  address: str = "127.0.0.1:0", spool: Spool | None = None) -> RunningServer:
    """Builds and starts a server bound to `address` (port 0 picks a free port).

    Every client may hold one call waiting at the barrier, so the pool has a
    thread per client of capacity plus room for the uploads that release them."""
    if spool is None:
        if config.spool_dir is None:
            raise ValueError("a spool directory is needed")
        spool = Spool(config.spool_dir, durable=config.durable)
    workers = config.capacity + 16
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=workers,
        options=[("grpc.so_reuseport", 0)])
    servicer = ParameterServerServicer(config, initial_model, spool)
    pb_grpc.add_ParameterServerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, servicer, health_servicer)
