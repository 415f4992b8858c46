"""Bad input against a real server process: each is refused with the right
status code and a message naming the problem, and changes nothing.

Two kinds of test:
- Per bad update, against one shared server whose round 1 never closes: every
  case sends from its own registered client, checks the status, the message
  and the structured ErrorInfo, then shows the bad update was not counted: the
  same client's good update is still accepted as its first.
- Scenarios, each on a fresh server with clients `alice` and `bob`: after the
  bad input the round is completed by good updates and the published model must
  be exactly the average of the good updates (same SHA-256 as
  average_state_dicts computes here), counting 2 updates.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paramserver import codec, errors, training
from paramserver.averaging import average_state_dicts
from paramserver.client import ParameterServerClient
from paramserver.v1 import parameter_server_pb2 as pb
from paramserver.v1 import parameter_server_pb2_grpc as pb_grpc

from .harness import ServerFactory, ServerProcess, wait_for

StateDict = dict[str, torch.Tensor]
Requests = list[pb.SendUpdateRequest]

MODEL, SEED = "mlp", 0  # the server's defaults
ALICE, BOB = "alice", "bob"
CHUNK = 64 * 1024  # several chunks per update (the mlp payload is ~400 KB)
CALL_TIMEOUT = 30.0


# -- state_dicts and update streams -------------------------------------------------


def initial_model() -> StateDict:
    return dict(training.build_model(MODEL, SEED).state_dict())


def perturbed(base: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def payload_of(state: Mapping[str, torch.Tensor]) -> bytes:
    return b"".join(codec.payload_views(state))


def upload(sender: str, round: int, state: Mapping[str, torch.Tensor], *,
           num_examples: int = 100, metrics: Mapping[str, float] | None = None,
           sha256: bytes | None = None, payload: bytes | None = None,
           specs: codec.ModelSpec | None = None, chunk_size: int = CHUNK) -> Requests:
    """A SendUpdate stream, by default a valid one for `state`; each keyword
    replaces one part of it (the digest defaults to the payload actually sent)."""
    data = payload_of(state) if payload is None else payload
    header = codec.UpdateHeader(
        sender, round, num_examples, codec.spec_of(state) if specs is None else specs,
        hashlib.sha256(data).digest() if sha256 is None else sha256,
        {"loss": 0.5} if metrics is None else dict(metrics))
    return list(codec.update_requests(header, [data], chunk_size))


def renamed(state: StateDict, old: str, new: str) -> StateDict:
    return {new if k == old else k: v for k, v in state.items()}


def without(state: StateDict, name: str) -> StateDict:
    return {k: v for k, v in state.items() if k != name}


def replaced(state: StateDict, name: str, tensor: torch.Tensor) -> StateDict:
    return {k: tensor if k == name else v for k, v in state.items()}


def with_value(state: StateDict, name: str, index: int, value: float) -> StateDict:
    tensor = state[name].clone()
    tensor.view(-1)[index] = value
    return replaced(state, name, tensor)


def straddling_index(state: StateDict, name: str, chunk_size: int) -> int:
    """An element of `name` whose bytes are split between two chunks."""
    offset = 0
    for key, tensor in state.items():
        if key == name:
            size = tensor.element_size()
            for i in range(tensor.numel()):
                start = offset + i * size
                if start // chunk_size != (start + size - 1) // chunk_size:
                    return i
            raise AssertionError(f"no element of {name} straddles a chunk boundary")
        offset += tensor.numel() * tensor.element_size()
    raise KeyError(name)


def unknown_dtype(requests: Requests) -> Requests:
    header = pb.SendUpdateRequest()
    header.CopyFrom(requests[0])
    spec: Any = header.header.tensors[1]  # an open proto3 enum takes any number
    spec.dtype = 99
    return [header, *requests[1:]]


# -- the bad updates -----------------------------------------------------------------

Build = Callable[[str, int, StateDict], Requests]  # (sender, round, state) -> stream
INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class BadUpdate:
    id: str
    build: Build
    code: grpc.StatusCode
    fragments: tuple[str, ...]  # must all be in the status message
    reason: str  # the error class the server reports in its ErrorInfo
    tensor: str | None = None  # the tensor the ErrorInfo names


def _straddling_nan(s: str, r: int, x: StateDict) -> Requests:
    chunk = 4097  # not a multiple of 4: float32 elements are cut between chunks
    return upload(s, r, with_value(x, "2.weight", straddling_index(x, "2.weight", chunk),
                                   float("nan")), chunk_size=chunk)


BAD_UPDATES: list[BadUpdate] = [
    BadUpdate("unknown-client", lambda s, r, x: upload("mallory", r, x), NOT_FOUND,
              ("unknown client 'mallory'",), "UnknownClientError"),
    BadUpdate("stale-round", lambda s, r, x: upload(s, r - 1, x), PRECONDITION,
              ("round 0 is closed", "open round is 1"), "StaleRoundError"),
    BadUpdate("future-round", lambda s, r, x: upload(s, r + 1, x), PRECONDITION,
              ("round 2 has not opened yet", "open round is 1"), "FutureRoundError"),
    BadUpdate("far-future-round", lambda s, r, x: upload(s, 2**64 - 1, x), PRECONDITION,
              (f"round {2**64 - 1} has not opened yet",), "FutureRoundError"),
    BadUpdate("renamed-tensor", lambda s, r, x: upload(s, r, renamed(x, "0.weight", "0.kernel")),
              INVALID, ("'0.weight'", "'0.kernel'"), "MalformedUpdateError"),
    BadUpdate("missing-tensor", lambda s, r, x: upload(s, r, without(x, "2.bias")),
              INVALID, ("missing ['2.bias']",), "MalformedUpdateError"),
    BadUpdate("extra-tensor",
              lambda s, r, x: upload(s, r, {**x, "3.weight": torch.zeros(10, 10)}),
              INVALID, ("unexpected ['3.weight']",), "MalformedUpdateError"),
    BadUpdate("tensors-out-of-order", lambda s, r, x: upload(s, r, dict(reversed(x.items()))),
              INVALID, ("out of order",), "MalformedUpdateError"),
    BadUpdate("duplicate-tensor-name",
              lambda s, r, x: upload(s, r, x, specs=tuple(
                  codec.TensorSpec("0.weight", t.dtype, t.shape) if t.name == "0.bias" else t
                  for t in codec.spec_of(x))),
              INVALID, ("'0.weight'", "twice"), "DecodeError", "0.weight"),
    BadUpdate("wrong-shape",
              lambda s, r, x: upload(s, r, replaced(x, "0.weight", x["0.weight"].t().clone())),
              INVALID, ("'0.weight'", "shape [784, 128]", "expected [128, 784]"),
              "MalformedUpdateError", "0.weight"),
    BadUpdate("wrong-dtype",
              lambda s, r, x: upload(s, r, replaced(x, "2.bias", x["2.bias"].double())),
              INVALID, ("'2.bias'", "float64", "expected torch.float32"),
              "MalformedUpdateError", "2.bias"),
    BadUpdate("unknown-dtype", lambda s, r, x: unknown_dtype(upload(s, r, x)),
              INVALID, ("'0.bias'", "unknown dtype 99"), "DecodeError", "0.bias"),
    BadUpdate("too-few-bytes",
              lambda s, r, x: upload(s, r, x, payload=payload_of(x)[:-10]),
              INVALID, ("truncated payload", "'2.bias'"), "MalformedUpdateError"),
    BadUpdate("too-many-bytes",
              lambda s, r, x: upload(s, r, x, payload=payload_of(x) + bytes(8)),
              INVALID, ("payload longer than",), "MalformedUpdateError"),
    BadUpdate("nan", lambda s, r, x: upload(s, r, with_value(x, "0.bias", 3, float("nan"))),
              INVALID, ("'0.bias'", "NaN or Inf"), "MalformedUpdateError", "0.bias"),
    BadUpdate("nan-across-chunks", _straddling_nan,
              INVALID, ("'2.weight'", "NaN or Inf"), "MalformedUpdateError", "2.weight"),
    BadUpdate("inf", lambda s, r, x: upload(s, r, with_value(x, "0.weight", 0, float("inf"))),
              INVALID, ("'0.weight'", "NaN or Inf"), "MalformedUpdateError", "0.weight"),
    BadUpdate("wrong-sha256", lambda s, r, x: upload(s, r, x, sha256=bytes(32)),
              INVALID, ("sha256 does not match",), "MalformedUpdateError"),
    BadUpdate("short-sha256", lambda s, r, x: upload(s, r, x, sha256=bytes(16)),
              INVALID, ("sha256 must be 32 bytes",), "DecodeError"),
    BadUpdate("zero-examples", lambda s, r, x: upload(s, r, x, num_examples=0),
              INVALID, ("num_examples",), "DecodeError"),
    BadUpdate("non-finite-metric",
              lambda s, r, x: upload(s, r, x, metrics={"loss": float("inf")}),
              INVALID, ("metric 'loss' is not finite",), "DecodeError"),
    BadUpdate("empty-stream", lambda s, r, x: [],
              INVALID, ("must start with an UpdateHeader",), "DecodeError"),
    BadUpdate("no-header", lambda s, r, x: upload(s, r, x)[1:],
              INVALID, ("must start with an UpdateHeader",), "DecodeError"),
    BadUpdate("data-before-header",
              lambda s, r, x: [(u := upload(s, r, x))[1], u[0], *u[2:]],
              INVALID, ("must start with an UpdateHeader",), "DecodeError"),
    BadUpdate("header-twice", lambda s, r, x: [(u := upload(s, r, x))[0], *u],
              INVALID, ("UpdateHeader sent twice",), "DecodeError"),
    BadUpdate("empty-message-mid-payload",
              lambda s, r, x: [(u := upload(s, r, x))[0], u[1], pb.SendUpdateRequest(), *u[2:]],
              INVALID, ("empty SendUpdateRequest",), "DecodeError"),
    BadUpdate("header-again-mid-payload",
              lambda s, r, x: [(u := upload(s, r, x))[0], u[1], u[0], *u[2:]],
              INVALID, ("UpdateHeader sent twice",), "DecodeError"),
]


# -- checking refusals ------------------------------------------------------------------


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def expect_refusal(server: ServerProcess, call: Callable[[], object], code: grpc.StatusCode,
                   fragments: Sequence[str] = (), reason: str | None = None,
                   tensor: str | None = None) -> grpc.RpcError:
    """Runs `call`, which must fail with `code` and a message holding every
    fragment; the server must still be running."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    details = error.details() or ""
    context = f"got {error.code()}: {details!r}"
    assert error.code() == code, context
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in the message; {context}"
    if reason is not None:
        info = error_info(error)
        assert info is not None, f"no ErrorInfo; {context}"
        assert (info.domain, info.reason) == ("paramserver", reason), info
        assert info.metadata.get("tensor") == tensor, info
    server.assert_alive()
    return error


def make_stub(channel: grpc.Channel) -> Any:
    return pb_grpc.ParameterServerStub(channel)  # type: ignore[no-untyped-call]


def send(stub: Any, requests: Sequence[pb.SendUpdateRequest]) -> pb.SendUpdateResponse:
    response: pb.SendUpdateResponse = stub.SendUpdate(iter(requests), timeout=CALL_TIMEOUT)
    return response


def get_model(stub: Any, client_id: str, round: int, timeout: float = CALL_TIMEOUT) -> None:
    list(stub.GetAveragedModel(pb.GetAveragedModelRequest(client_id=client_id, round=round),
                               timeout=timeout))


# -- a shared server for the per-case checks ------------------------------------------


@dataclass
class SharedServer:
    server: ServerProcess
    stub: Any
    client: ParameterServerClient
    logs: list[Path]
    cohort: int
    good: StateDict
    bad: StateDict


HOLDOUT = "holdout"  # registered, never sends: round 1 of the shared server never closes


def sender_for(case: BadUpdate) -> str:
    return f"case-{case.id}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    names = [sender_for(c) for c in BAD_UPDATES] + ["getter", HOLDOUT]
    logs: list[Path] = []
    with contextlib.ExitStack() as stack:
        factory = ServerFactory(stack, tmp_path_factory.mktemp("shared"), logs)
        server = factory(clients=len(names))
        channel = stack.enter_context(grpc.insecure_channel(server.address))
        client = stack.enter_context(ParameterServerClient(server.address, timeout=CALL_TIMEOUT))
        for name in names:
            assert client.register(name).first_round == 1
        initial = initial_model()
        yield SharedServer(server, make_stub(channel), client, logs,
                           len(names), perturbed(initial, 1), perturbed(initial, 2))


@pytest.mark.parametrize("case", BAD_UPDATES, ids=[c.id for c in BAD_UPDATES])
def test_bad_update_is_refused_and_not_counted(case: BadUpdate, shared: SharedServer,
                                               process_logs: list[Path]) -> None:
    process_logs.extend(shared.logs)
    sender = sender_for(case)
    requests = case.build(sender, 1, shared.bad)
    expect_refusal(shared.server, lambda: send(shared.stub, requests), case.code,
                   case.fragments, case.reason, case.tensor)
    # Not counted: the sender's good update is still taken as its first for the round.
    ack = shared.client.send_update(sender, 1, shared.good, num_examples=100)
    assert (ack.round, ack.duplicate, ack.expected) == (1, False, shared.cohort), ack


def test_get_model_for_unknown_client_or_future_round(shared: SharedServer,
                                                      process_logs: list[Path]) -> None:
    process_logs.extend(shared.logs)
    expect_refusal(shared.server, lambda: get_model(shared.stub, "mallory", 0),
                   grpc.StatusCode.NOT_FOUND, ("unknown client 'mallory'",),
                   "UnknownClientError")
    expect_refusal(shared.server, lambda: get_model(shared.stub, "getter", 2),
                   grpc.StatusCode.FAILED_PRECONDITION,
                   ("round 2 has not opened yet", "open round is 1"), "FutureRoundError")
    # The library turns the status back into our error, with its fields.
    with pytest.raises(errors.FutureRoundError) as caught:
        shared.client.get_model("getter", 5)
    assert (caught.value.round, caught.value.open_round) == (5, 1)


def test_get_model_for_open_round_exceeds_deadline(shared: SharedServer,
                                                   process_logs: list[Path]) -> None:
    process_logs.extend(shared.logs)
    log_before = shared.server.log_size()
    for _ in range(3):
        expect_refusal(shared.server, lambda: get_model(shared.stub, "getter", 1, timeout=0.3),
                       grpc.StatusCode.DEADLINE_EXCEEDED)
    # The round-0 model is still served at once: the waits changed nothing.
    header, _ = shared.client.get_model("getter", 0)
    assert (header.round, header.num_updates) == (0, 0)
    new_log = shared.server.log_since(log_before)
    assert "Traceback" not in new_log, new_log


# -- fresh servers for the scenarios ----------------------------------------------------


@dataclass
class Probe:
    """A fresh server (--clients 2) with alice and bob registered: round 1 is open."""

    server: ServerProcess
    stub: Any
    client: ParameterServerClient
    initial: StateDict
    specs: codec.ModelSpec = field(init=False)

    def __post_init__(self) -> None:
        self.specs = codec.spec_of(self.initial)

    def send_good(self, client_id: str, round: int, state: StateDict, weight: int,
                  expect_received: int) -> None:
        ack = self.client.send_update(client_id, round, state, weight, {"loss": 1.0})
        assert (ack.round, ack.duplicate, ack.received, ack.expected) == (
            round, False, expect_received, 2), ack

    def check_round(self, round: int, updates: Mapping[str, tuple[int, StateDict]],
                    ) -> StateDict:
        """The model published for `round` is exactly the average of `updates`."""
        header, model = self.client.get_model(ALICE, round, timeout=60)
        expected = average_state_dicts(updates, self.specs)
        assert header.round == round
        assert header.num_updates == len(updates), header
        assert header.total_examples == sum(w for w, _ in updates.values()), header
        assert header.sha256 == codec.state_dict_digest(expected), (
            "the published model is not the average of exactly the good updates")
        assert all(torch.equal(model[k], expected[k]) for k in expected)
        record = self.server.wait_for_rounds(round)[round - 1]
        assert (record["round"], record["num_updates"], record["sha256"]) == (
            round, len(updates), header.sha256.hex()), record
        return model

    def complete_round(self, round: int, updates: Mapping[str, tuple[int, StateDict]],
                       ) -> StateDict:
        for received, (name, (weight, state)) in enumerate(sorted(updates.items()), 1):
            self.send_good(name, round, state, weight, received)
        return self.check_round(round, updates)


@pytest.fixture
def probe(server_factory: ServerFactory, process_stack: contextlib.ExitStack) -> Probe:
    server = server_factory(clients=2)
    channel = process_stack.enter_context(grpc.insecure_channel(server.address))
    client = process_stack.enter_context(
        ParameterServerClient(server.address, timeout=CALL_TIMEOUT))
    for name in (ALICE, BOB):
        registration = client.register(name)
        assert (registration.client_id, registration.first_round) == (name, 1)
    header, initial = client.get_model(ALICE, 0)
    assert header.sha256 == codec.state_dict_digest(initial_model()), "round 0 is not the seed's"
    return Probe(server, make_stub(channel), client, initial)


def good_updates(base: StateDict) -> dict[str, tuple[int, StateDict]]:
    return {ALICE: (100, perturbed(base, 11)), BOB: (300, perturbed(base, 12))}


def test_all_bad_inputs_change_nothing(probe: Probe) -> None:
    """Every bad update from alice, then alice and bob complete round 1: the model
    is the average of their good updates only, and nothing was left on disk."""
    bad = perturbed(probe.initial, 13)
    for case in BAD_UPDATES:
        requests = case.build(ALICE, 1, bad)
        expect_refusal(probe.server, functools.partial(send, probe.stub, requests),
                       case.code, case.fragments, case.reason, case.tensor)
    for round in (0, 2):  # GetAveragedModel refusals too
        expect_refusal(probe.server, functools.partial(get_model, probe.stub, "mallory", round),
                       grpc.StatusCode.NOT_FOUND)
    assert probe.server.spool_files() == [], "a refused update left files in the spool"
    probe.complete_round(1, good_updates(probe.initial))


def test_invalid_client_names(server_factory: ServerFactory,
                              process_stack: contextlib.ExitStack) -> None:
    server = server_factory(clients=2)
    channel = process_stack.enter_context(grpc.insecure_channel(server.address))
    stub = make_stub(channel)
    first = stub.RegisterClient(pb.RegisterClientRequest(client_name=ALICE), timeout=CALL_TIMEOUT)
    assert (first.client_id, first.first_round, first.clients, first.total_rounds) == (
        ALICE, 1, 2, 0)
    assert codec.specs_from_proto(first.tensors) == codec.spec_of(initial_model())

    for name in ("", "bad name", "x" * 65, "client/1", "../alice", "ünïcödé", "a\nb"):
        expect_refusal(
            server, functools.partial(stub.RegisterClient,
                                      pb.RegisterClientRequest(client_name=name),
                                      timeout=CALL_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT, ("invalid client name", repr(name)),
            "InvalidClientNameError")
    with (ParameterServerClient(server.address, timeout=CALL_TIMEOUT) as client,
          pytest.raises(errors.InvalidClientNameError, match="invalid client name")):
        client.register("no spaces")

    # None of them took a slot: round 1 opens when bob registers, with 2 clients.
    again = stub.RegisterClient(pb.RegisterClientRequest(client_name=ALICE), timeout=CALL_TIMEOUT)
    assert (again.client_id, again.first_round) == (ALICE, 1), "registration is idempotent"
    second = stub.RegisterClient(pb.RegisterClientRequest(client_name=BOB), timeout=CALL_TIMEOUT)
    assert (second.client_id, second.first_round) == (BOB, 1)
    initial = initial_model()
    probe = Probe(server, stub, process_stack.enter_context(
        ParameterServerClient(server.address, timeout=CALL_TIMEOUT)), initial)
    probe.complete_round(1, good_updates(initial))


def test_conflicting_update_is_refused_and_identical_one_is_a_duplicate(probe: Probe) -> None:
    updates = good_updates(probe.initial)
    weight, alice = updates[ALICE]
    probe.send_good(ALICE, 1, alice, weight, expect_received=1)

    other = perturbed(probe.initial, 13)
    expect_refusal(probe.server, lambda: send(probe.stub, upload(ALICE, 1, other)),
                   grpc.StatusCode.ALREADY_EXISTS,
                   ("'alice' already sent a different update for round 1", "first one is kept"),
                   "ConflictingUpdateError")
    with pytest.raises(errors.ConflictingUpdateError) as caught:
        probe.client.send_update(ALICE, 1, other, weight)
    assert (caught.value.client_id, caught.value.round) == (ALICE, 1)

    for _ in range(2):  # the identical update again: acknowledged, counted once
        ack = send(probe.stub, upload(ALICE, 1, alice, num_examples=weight))
        assert (ack.round, ack.duplicate, ack.received, ack.expected) == (1, True, 1, 2), ack

    weight, bob = updates[BOB]
    probe.send_good(BOB, 1, bob, weight, expect_received=2)
    probe.check_round(1, updates)


def test_update_for_a_closed_round_is_refused(probe: Probe) -> None:
    model = probe.complete_round(1, good_updates(probe.initial))
    late = perturbed(probe.initial, 13)
    expect_refusal(probe.server, lambda: send(probe.stub, upload(ALICE, 1, late)),
                   grpc.StatusCode.FAILED_PRECONDITION,
                   ("round 1 is closed", "open round is 2"), "StaleRoundError")
    with pytest.raises(errors.StaleRoundError) as caught:
        probe.client.send_update(ALICE, 1, late, 100)
    assert (caught.value.round, caught.value.open_round) == (1, 2)
    # Older global models are not kept; later ones do not exist yet.
    expect_refusal(probe.server, lambda: get_model(probe.stub, ALICE, 0),
                   grpc.StatusCode.FAILED_PRECONDITION, ("round 0 is closed",), "StaleRoundError")
    expect_refusal(probe.server, lambda: get_model(probe.stub, ALICE, 3),
                   grpc.StatusCode.FAILED_PRECONDITION, ("round 3 has not opened yet",),
                   "FutureRoundError")
    probe.complete_round(2, good_updates(model))


def test_client_cancelling_mid_stream_is_not_counted(probe: Probe) -> None:
    requests = upload(ALICE, 1, perturbed(probe.initial, 13))
    assert len(requests) > 3
    sent, release = threading.Event(), threading.Event()

    def stream() -> Iterator[pb.SendUpdateRequest]:
        yield from requests[:2]  # the header and one chunk, then nothing more
        sent.set()
        release.wait(CALL_TIMEOUT)

    future = probe.stub.SendUpdate.future(stream(), timeout=CALL_TIMEOUT)
    try:
        assert sent.wait(10)
        wait_for(probe.server.spool_files, 10, "the server to start receiving the update")
        assert future.cancel(), "the call ended before it could be cancelled"
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=10)
    wait_for(lambda: not probe.server.spool_files(), 10, "the partial upload to be discarded")
    probe.server.assert_alive()
    # Not counted: alice's (different) good update is her first for round 1.
    probe.complete_round(1, good_updates(probe.initial))


def test_update_from_a_client_that_joined_during_the_round(shared: SharedServer,
                                                            process_logs: list[Path]) -> None:
    process_logs.extend(shared.logs)
    registration = shared.client.register("newcomer")  # round 1 is open: it joins round 2
    assert registration.first_round == 2
    expect_refusal(shared.server, lambda: send(shared.stub, upload("newcomer", 1, shared.good)),
                   grpc.StatusCode.FAILED_PRECONDITION,
                   ("'newcomer' is not in the cohort of round 1", "from round 2"),
                   "NotInCohortError")
    expect_refusal(shared.server, lambda: send(shared.stub, upload("newcomer", 2, shared.good)),
                   grpc.StatusCode.FAILED_PRECONDITION, ("round 2 has not opened yet",),
                   "FutureRoundError")


def test_capacity_and_a_finished_run(server_factory: ServerFactory,
                                     process_stack: contextlib.ExitStack) -> None:
    server = server_factory("--capacity", "2", clients=1, rounds=1)
    client = process_stack.enter_context(
        ParameterServerClient(server.address, timeout=CALL_TIMEOUT))
    stub = make_stub(process_stack.enter_context(grpc.insecure_channel(server.address)))
    assert client.register(ALICE).first_round == 1  # round 1 opens with alice alone
    assert client.register(BOB).first_round == 2
    expect_refusal(server, functools.partial(
        stub.RegisterClient, pb.RegisterClientRequest(client_name="carol"), timeout=CALL_TIMEOUT),
        grpc.StatusCode.RESOURCE_EXHAUSTED, ("capacity of 2",), "CapacityError")
    assert client.register(BOB).first_round == 2, "a known name keeps its slot at capacity"

    initial = initial_model()
    update = perturbed(initial, 11)
    ack = client.send_update(ALICE, 1, update, 50)
    assert (ack.round, ack.duplicate, ack.received, ack.expected) == (1, False, 1, 1)
    header, model = client.get_model(ALICE, 1, timeout=60)
    expected = average_state_dicts({ALICE: (50, update)})
    assert (header.round, header.num_updates, header.total_examples) == (1, 1, 50)
    assert header.sha256 == codec.state_dict_digest(expected)

    # The run is over: no round 2, for alice or for bob who was waiting for it.
    for name in (ALICE, BOB):
        expect_refusal(server, functools.partial(send, stub, upload(name, 2, model)),
                       grpc.StatusCode.FAILED_PRECONDITION, ("past the end of the run",),
                       "RunFinishedError")
    expect_refusal(server, functools.partial(get_model, stub, BOB, 2),
                   grpc.StatusCode.FAILED_PRECONDITION, ("past the end of the run",),
                   "RunFinishedError")
    header, _ = client.get_model(BOB, 1)  # the final model is still served
    assert header.sha256 == codec.state_dict_digest(expected)
    assert [r["round"] for r in server.wait_for_rounds(1)] == [1]


def test_huge_num_examples_cannot_wedge_the_round(probe: Probe) -> None:
    """num_examples is a uint64 and so is the round's total_examples: a weight of
    2**64 - 1 plus any other must not leave a round whose model cannot be served.
    Refusing such a weight (INVALID_ARGUMENT naming num_examples) is fine."""
    updates = good_updates(probe.initial)
    accepted: dict[str, tuple[int, StateDict]] = {}
    for name, weight in ((ALICE, 2**64 - 1), (BOB, 1)):
        state = updates[name][1]
        refusal: errors.MalformedUpdateError | None = None
        try:
            probe.client.send_update(name, 1, state, weight)
        except errors.MalformedUpdateError as error:
            refusal = error
        if refusal is not None:
            assert "num_examples" in str(refusal), refusal
            weight = 100
            probe.client.send_update(name, 1, state, weight)
        accepted[name] = (weight, state)
    probe.check_round(1, accepted)


def test_identical_update_resent_after_its_round_closed_is_a_duplicate(probe: Probe) -> None:
    """The proto promises that re-sending the identical update for the same round
    is acknowledged again (duplicate = true), so an upload may be retried safely.
    The update most likely to be retried is the one that closed the round: if its
    acknowledgement is lost, the retry arrives after the round has closed."""
    updates = good_updates(probe.initial)
    model = probe.complete_round(1, updates)
    weight, bob = updates[BOB]  # bob's update closed round 1
    ack = send(probe.stub, upload(BOB, 1, bob, num_examples=weight))
    assert (ack.round, ack.duplicate) == (1, True), ack
    probe.complete_round(2, good_updates(model))
