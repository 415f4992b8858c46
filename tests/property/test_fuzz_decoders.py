"""Fuzz targets: every decoder that reads outside input (the wire, headers and
specs, secure aggregation's messages, credentials, the state dir's files on
resume) and a real server taking hostile requests on every RPC.

The contract: a decoder returns a well-formed value or raises the error it
documents (one of ours: DecodeError, MalformedUpdateError, SecAggError,
UnauthenticatedError, TokenFileError, StateDirError...), never anything else
(ValueError, KeyError, struct.error, UnicodeError, OverflowError,
RecursionError, torch's...); wire.Decoder and wire.lenient never raise; and
the server never answers INTERNAL or UNKNOWN. `outcome` below is the check: an
error that is not allowed propagates and fails the test with its traceback.

Inputs are arbitrary bytes and, since random bytes rarely get past the first
check, structure-aware ones: a valid message, file or JSON document with a few
fields or bytes changed (`mutated`, `mutated_bytes`, `json_files`).

Budget: a target runs the profile's max_examples (ci: 150, derandomized;
fuzz: `make fuzz`, 2,000, new inputs each run); the expensive ones (a state
dir resumed, a real server) a fraction of it (`scaled`). What these targets
found is fixed where it lived (state.read_json, journal._names, spool.read_update,
security.Tokens) and each stays a target here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from property_strategies import (
    entries,
    raw_tensors,
    split_points,
    wire_model_headers,
    wire_update_headers,
)

from paramserver import codec, secagg_codec, security, shamir, spool, state, wire
from paramserver.config import SecAggSettings
from paramserver.coordinator import Coordinator, ServerConfig
from paramserver.errors import (
    CredentialsUnavailableError,
    DecodeError,
    MalformedUpdateError,
    ParamServerError,
    PermissionDeniedError,
    SecAggError,
    UnauthenticatedError,
)
from paramserver.quantize import Quantization
from paramserver.rounds import MAX_NAME_LENGTH
from paramserver.secagg_crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    new_private_key,
    open_shares,
    public_bytes,
    seal_shares,
)
from paramserver.secagg_messages import ADVERT_SIZE, advert_from_bytes
from paramserver.server import RunningServer, create_server
from paramserver.tokens import MAX_TOKEN_LENGTH, TokenFileError, TokenStore
from paramserver.training import build_model
from paramserver.v1 import parameter_server_pb2 as pb

# The thread method: pytest-timeout's signal method does not end a hang inside
# a hypothesis test (see test_prop_rounds.py). The limit is the global one
# (`make fuzz` raises it for its longer run).
pytestmark = pytest.mark.timeout(method="thread")

T = TypeVar("T")
M = TypeVar("M", bound=Message)
StateDict = dict[str, torch.Tensor]

# -- budget ---------------------------------------------------------------------------


def scaled(divisor: int, least: int = 5) -> int:
    """A fraction of the loaded profile's max_examples, for an expensive target."""
    return max(least, settings().max_examples // divisor)


SLOW = settings(max_examples=scaled(10), suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=scaled(20), suppress_health_check=[HealthCheck.too_slow])

# -- the contract -----------------------------------------------------------------------


def outcome(call: Callable[[], T], *allowed: type[ParamServerError]) -> T | None:
    """call()'s value, or None if it raised one of `allowed` (our errors);
    any other exception propagates: that is the bug a target looks for."""
    try:
        return call()
    except allowed:
        return None


# -- models -------------------------------------------------------------------------------


@functools.cache
def mlp() -> StateDict:
    """The mlp task's initial model (without touching the global torch RNG)."""
    with torch.random.fork_rng():
        return {k: v.detach().clone() for k, v in build_model("mlp", 0).state_dict().items()}


@functools.cache
def mlp_specs() -> codec.ModelSpec:
    return codec.spec_of(mlp())


# A small model where the model's size does not matter (files, the secure server).
TINY: StateDict = {"w": torch.arange(12, dtype=torch.float32).reshape(4, 3),
                   "b": torch.zeros(3), "steps": torch.tensor(7)}
TINY_SPECS = codec.spec_of(TINY)


def payload_of(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    return b"".join(codec.payload_views(state_dict))


@functools.cache
def update_payload(specs: codec.ModelSpec, value: float) -> bytes:
    """The payload of a model of `specs` with every element `value`."""
    return payload_of({s.name: torch.full(s.shape, value, dtype=s.dtype) for s in specs})


def seeded(label: str) -> Callable[[int], bytes]:
    """A deterministic random source: the same keys and boxes on every run,
    so that the ci profile's derandomized examples are the same too."""
    counter = iter(range(1 << 30))

    def rng(size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()
        return out[:size]

    return rng


# -- mutating bytes -------------------------------------------------------------------------

Mutation = Callable[[st.DrawFn, bytearray, int], None]


def _flip(draw: st.DrawFn, data: bytearray, at: int) -> None:
    if data:
        data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))


def _overwrite(draw: st.DrawFn, data: bytearray, at: int) -> None:
    if data:
        data[min(at, len(data) - 1)] = draw(st.one_of(st.sampled_from([0, 0x7F, 0x80, 0xFF]),
                                                       st.integers(0, 255)))


def _insert(draw: st.DrawFn, data: bytearray, at: int) -> None:
    data[at:at] = draw(st.binary(min_size=1, max_size=16))


def _delete(draw: st.DrawFn, data: bytearray, at: int) -> None:
    del data[at:at + draw(st.integers(1, 16))]


def _truncate(draw: st.DrawFn, data: bytearray, at: int) -> None:
    del data[at:]


def _repeat(draw: st.DrawFn, data: bytearray, at: int) -> None:
    piece = data[at:at + draw(st.integers(1, 64))]
    data[at:at] = piece * draw(st.integers(1, 4))


def _huge_varint(draw: st.DrawFn, data: bytearray, at: int) -> None:
    # A length or a number as large as a varint holds (or more than it may).
    data[at:at] = draw(st.sampled_from([b"\xff" * 9 + b"\x01", b"\xff" * 11,
                                        b"\xff\xff\xff\xff\x0f",
                                        b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02"]))


BYTE_MUTATIONS: tuple[Mutation, ...] = (_flip, _overwrite, _insert, _delete, _truncate, _repeat,
                                        _huge_varint)


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes, max_mutations: int = 4, hot: int = 512) -> bytes:
    """`base` with 1..max_mutations byte-level changes, half of them within
    its first `hot` bytes (where headers and lengths are)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        at = draw(st.one_of(st.integers(0, min(len(data), hot)), st.integers(0, len(data))))
        draw(st.sampled_from(BYTE_MUTATIONS))(draw, data, at)
    return bytes(data)


# -- mutating protobuf messages, field by field ------------------------------------------------

FD = FieldDescriptor
_INT_RANGES: dict[int, tuple[int, int]] = {
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1), FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1), FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_ENUM: (-(2**31), 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
}
_EDGES = (0, 1, 2, 3, -1, 2**31, 2**32, 2**40, 2**40 + 1, 2**53 + 1, 2**63, 2**64 - 1)
# Strings protobuf can encode (no lone surrogates): names that exist, names
# just past the rules, and anything.
proto_strings = st.one_of(
    st.sampled_from(["", "a", "b", "c", "ghost", "z" * MAX_NAME_LENGTH,
                     "z" * (MAX_NAME_LENGTH + 1), "a b", "\u00e9", "a\x00", "0.weight"]),
    st.text(max_size=12), st.text(alphabet="ab._-", min_size=1, max_size=70))
proto_bytes = st.one_of(st.binary(max_size=40), st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE),
                        st.binary(min_size=shamir.SHARE_SIZE, max_size=shamir.SHARE_SIZE),
                        st.sampled_from([bytes(KEY_SIZE), b"\xff" * shamir.SHARE_SIZE]))
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FD.TYPE_DOUBLE: st.floats(), FD.TYPE_FLOAT: st.floats(width=32), FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_STRING: proto_strings, FD.TYPE_BYTES: proto_bytes,
}
MAX_DEPTH = 3


def field_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Any value the field's type holds, edge values often."""
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        edges = [v for v in _EDGES if low <= v <= high]
        return st.one_of(st.integers(0, 8), st.sampled_from(edges),
                         st.integers(low, high))
    return _SCALARS[field.type]


def mutate(draw: st.DrawFn, message: Message, depth: int = 0) -> None:
    """One change to one field of `message`: set, clear, or, in a repeated
    field or a map, add, delete, duplicate or repeat an element, or change one
    (recursing into sub-messages)."""
    fields: list[Any] = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    field: FieldDescriptor = draw(st.sampled_from(fields))
    value: Any = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        _mutate_map(draw, value, field, depth)
    elif field.is_repeated:
        _mutate_repeated(draw, value, field, depth)
    elif draw(st.integers(0, 4)) == 0 or (field.message_type is not None and depth >= MAX_DEPTH):
        message.ClearField(field.name)
    elif field.message_type is not None:
        value.SetInParent()
        mutate(draw, value, depth + 1)
    else:
        setattr(message, field.name, draw(field_values(field)))


def _mutate_repeated(draw: st.DrawFn, container: Any, field: FieldDescriptor, depth: int) -> None:
    is_message = field.message_type is not None
    op = draw(st.sampled_from(["add", "delete", "clear", "copy", "repeat", "change"]))
    if op == "clear":
        del container[:]
        return
    if op == "add" or not len(container):
        if is_message:
            element = container.add()
            for _ in range(draw(st.integers(0, 2)) if depth < MAX_DEPTH else 0):
                mutate(draw, element, depth + 1)
        else:
            container.append(draw(field_values(field)))
        return
    index = draw(st.integers(0, len(container) - 1))
    if op == "delete":
        del container[index]
    elif op in ("copy", "repeat"):
        count = 1 if op == "copy" else draw(st.sampled_from([2, 17, 1000]))
        for _ in range(count):
            if is_message:
                container.add().CopyFrom(container[index])
            else:
                container.append(container[index])
    elif is_message:
        if depth < MAX_DEPTH:
            mutate(draw, container[index], depth + 1)
    else:
        container[index] = draw(field_values(field))


def _mutate_map(draw: st.DrawFn, container: Any, field: FieldDescriptor, depth: int) -> None:
    entry: Any = field.message_type  # a map field's is never None
    key_field = entry.fields_by_name["key"]
    value_field = entry.fields_by_name["value"]
    if len(container) and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(container)))
        if draw(st.booleans()):
            del container[key]
            return
    else:
        key = draw(field_values(key_field))
    if value_field.message_type is not None:
        if depth < MAX_DEPTH:
            mutate(draw, container[key], depth + 1)
    else:
        container[key] = draw(field_values(value_field))


@st.composite
def mutated(draw: st.DrawFn, base: M, max_mutations: int = 3) -> M:
    """A copy of `base` with 0..max_mutations field-level changes."""
    message: M = type(base)()
    message.CopyFrom(base)
    for _ in range(draw(st.integers(0, max_mutations))):
        mutate(draw, message)
    return message


def parsed_or_empty(cls: type[M], raw: bytes) -> M:
    try:
        return cls.FromString(raw)
    except Exception:  # any refusal: the message is what protobuf gives for nothing
        return cls()


def messages_like(*bases: M) -> st.SearchStrategy[M]:
    """Messages of the bases' type: field-mutated bases, and whatever protobuf
    makes of byte-mutated or arbitrary bytes."""
    cls = type(bases[0])
    as_bytes = st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b.SerializeToString() for b in bases]).flatmap(mutated_bytes))
    field_mutated = st.sampled_from(bases).flatmap(mutated)
    return st.one_of(field_mutated, field_mutated,
                     as_bytes.map(functools.partial(parsed_or_empty, cls)))


def encodings_like(*bases: M) -> st.SearchStrategy[bytes]:
    """Bytes for a decoder of the bases' type: arbitrary, field-mutated,
    byte-mutated, and two or three valid encodings back to back (a merge)."""
    serialized = [b.SerializeToString() for b in bases]
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from(bases).flatmap(mutated).map(lambda m: m.SerializeToString()),
        st.sampled_from(serialized).flatmap(mutated_bytes),
        st.lists(st.sampled_from(serialized), min_size=2, max_size=3).map(b"".join),
    )


# -- JSON documents ---------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                         st.sampled_from([10**400, -(10**400), 2**63, -1, 0.5, "a", "b"]))
json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
DEEP = b"[" * 100_000  # nested past any recursion limit


def mutate_json(draw: st.DrawFn, value: object, depth: int = 0) -> object:
    """`value` with one entry replaced, removed or added (anywhere in it), or
    replaced whole."""
    if depth >= 3 or draw(st.integers(0, 3)) == 0:
        return draw(json_values)
    if isinstance(value, dict) and value:
        out = dict(value)
        key = draw(st.sampled_from(sorted(out)))
        op = draw(st.sampled_from(["change", "delete", "add"]))
        if op == "change":
            out[key] = mutate_json(draw, out[key], depth + 1)
        elif op == "delete":
            del out[key]
        else:
            out[draw(st.text(max_size=8))] = draw(json_values)
        return out
    if isinstance(value, list) and value:
        items = list(value)
        index = draw(st.integers(0, len(items) - 1))
        op = draw(st.sampled_from(["change", "delete", "add"]))
        if op == "change":
            items[index] = mutate_json(draw, items[index], depth + 1)
        elif op == "delete":
            del items[index]
        else:
            items.insert(index, draw(json_values))
        return items
    return draw(json_values)


@st.composite
def json_files(draw: st.DrawFn, base: object) -> bytes:
    """A file that should hold `base` as JSON: a mutated document (maybe with
    bytes changed too), deep nesting, or arbitrary bytes."""
    kind = draw(st.sampled_from(["document", "document", "bytes", "nested", "junk"]))
    if kind == "nested":
        opener = draw(st.sampled_from([b"[", b'{"a": ', b'{"cohort": [']))
        return opener * draw(st.one_of(st.integers(1, 64), st.integers(900, 50_000)))
    if kind == "junk":
        return draw(st.binary(max_size=64))
    document = base
    for _ in range(draw(st.integers(1, 3))):
        document = mutate_json(draw, document)
    raw = json.dumps(document).encode()
    return draw(mutated_bytes(raw)) if kind == "bytes" else raw


# -- well-formed values -------------------------------------------------------------------------


def check_specs(specs: codec.ModelSpec) -> None:
    names = [s.name for s in specs]
    assert all(names), names
    assert len(set(names)) == len(names), names
    for s in specs:
        assert s.dtype in codec.SUPPORTED_DTYPES, s
        assert len(s.shape) <= codec.MAX_DIMS, s
        assert all(d >= 0 for d in s.shape), s
        assert math.prod(d for d in s.shape if d) * s.dtype.itemsize <= codec.MAX_TENSOR_BYTES, s


def check_metrics(metrics: Mapping[str, float]) -> None:
    assert all(isinstance(k, str) and math.isfinite(v) for k, v in metrics.items()), metrics


def check_name(name: object) -> None:
    assert isinstance(name, str), name
    assert 0 < len(name) <= MAX_NAME_LENGTH, name
    assert set(name) <= set(string.ascii_letters + string.digits + "._-"), name


def protobuf_accepts(cls: type[Message], raw: bytes) -> bool:
    try:
        cls.FromString(raw)
    except Exception:  # whatever protobuf refuses bytes with
        return False
    return True


# == 1. the wire =================================================================================

LAYOUTS: dict[str, tuple[type[Message], type[Message]]] = {
    "UpdateMessage": (pb.UpdateMessage, pb.UpdateHeader),
    "SendUpdateRequest": (pb.SendUpdateRequest, pb.UpdateHeader),
    "ModelMessage": (pb.ModelMessage, pb.ModelHeader),
    "GetAveragedModelResponse": (pb.GetAveragedModelResponse, pb.ModelHeader),
}


@functools.cache
def mlp_update_header() -> pb.UpdateHeader:
    digest = hashlib.sha256(update_payload(mlp_specs(), 0.5)).digest()
    header = codec.UpdateHeader("a", 1, 10, mlp_specs(), digest, {"loss": 0.25})
    return codec.update_header_to_proto(header)


@functools.cache
def mlp_model_header() -> pb.ModelHeader:
    header = codec.ModelHeader(1, mlp_specs(), hashlib.sha256(payload_of(mlp())).digest(), 2, 20,
                               {"loss": 0.5})
    return codec.model_header_to_proto(header)


@st.composite
def payload_messages(draw: st.DrawFn, layout: str) -> bytes:
    """Bytes for the layout's decoder: wire.encode of a (mutated) header and a
    payload, either part absent, mutated at the byte level, or arbitrary."""
    header_cls = LAYOUTS[layout][1]
    header: Message = mlp_update_header() if header_cls is pb.UpdateHeader else mlp_model_header()
    hostile = wire_update_headers() if header_cls is pb.UpdateHeader else wire_model_headers()
    header = draw(st.one_of(mutated(header), hostile))
    data = draw(st.binary(max_size=300))
    parts = draw(st.sampled_from(["both", "header", "data", "none"]))
    raw = wire.encode(header if parts in ("both", "header") else None,
                      [data] if parts in ("both", "data") else None)
    kind = draw(st.sampled_from(["valid", "bytes", "twice", "junk"]))
    if kind == "bytes":
        return draw(mutated_bytes(raw))
    if kind == "twice":
        return raw + wire.encode(None, [data])
    return draw(st.binary(max_size=300)) if kind == "junk" else raw


@pytest.mark.parametrize("layout", list(LAYOUTS))
@given(data=st.data())
def test_fuzz_wire_decoder(layout: str, data: st.DataObject) -> None:
    """wire.Decoder never raises: Parts with the header and a view of the
    payload, or an error, exactly when protobuf refuses the bytes."""
    message_cls, header_cls = LAYOUTS[layout]
    raw = data.draw(payload_messages(layout))
    parts = wire.Decoder(message_cls, header_cls)(raw)
    assert isinstance(parts, wire.Parts)
    oneof = message_cls.DESCRIPTOR.fields_by_name["data"].containing_oneof is not None
    if parts.error is not None:
        assert isinstance(parts.error, str)
        assert parts.header is None
        assert parts.data is None
        assert not protobuf_accepts(message_cls, raw), "refused bytes protobuf accepts"
        return
    assert protobuf_accepts(message_cls, raw), "accepted bytes protobuf refuses"
    assert parts.header is None or isinstance(parts.header, header_cls)
    assert parts.data is None or isinstance(parts.data, memoryview)
    assert oneof or parts.data is not None, "a message without a oneof always has a payload"


LENIENT: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (pb.RegisterClientRequest, pb.GetAveragedModelRequest,
                                  pb.NextRoundRequest, pb.EvaluationReport,
                                  pb.SecAggClientMessage)
}


@functools.cache
def secagg_client_messages() -> tuple[pb.SecAggClientMessage, ...]:
    rng = seeded("client-messages")
    advert = pb.SecAggAdvertise(client_id="a", round=1,
                                c_public_key=public_bytes(new_private_key(rng)),
                                s_public_key=public_bytes(new_private_key(rng)))
    return (pb.SecAggClientMessage(advertise=advert),
            pb.SecAggClientMessage(shares=pb.SecAggShares(ciphertexts={"b": rng(300)})),
            pb.SecAggClientMessage(confirm=pb.SecAggConfirm()),
            pb.SecAggClientMessage(reveal=pb.SecAggReveal(
                self_mask_shares={"a": rng(shamir.SHARE_SIZE)},
                key_shares={"c": rng(shamir.SHARE_SIZE)})))


def small_requests(name: str) -> tuple[Message, ...]:
    """Valid requests of the message named (bases to mutate)."""
    if name == "SecAggClientMessage":
        return secagg_client_messages()
    return {
        "RegisterClientRequest": (pb.RegisterClientRequest(
            client_name="a", tensors=codec.specs_to_proto(mlp_specs())),
            pb.RegisterClientRequest(client_name="b")),
        "GetAveragedModelRequest": (pb.GetAveragedModelRequest(client_id="a", round=1),),
        "NextRoundRequest": (pb.NextRoundRequest(client_id="a", after_round=0),),
        "EvaluationReport": (pb.EvaluationReport(client_id="a", round=1, num_examples=10,
                                                 metrics={"accuracy": 0.5}),),
    }[name]


@pytest.mark.parametrize("name", list(LENIENT))
@given(data=st.data())
def test_fuzz_lenient_deserializers(name: str, data: st.DataObject) -> None:
    """wire.lenient never raises: the message, or Unparseable exactly when
    protobuf refuses the bytes."""
    cls = LENIENT[name]
    raw = data.draw(encodings_like(*small_requests(name)))
    result = wire.lenient(cls)(raw)
    if isinstance(result, wire.Unparseable):
        assert isinstance(result.error, str)
        assert not protobuf_accepts(cls, raw)
    else:
        assert isinstance(result, cls)


# == 2. headers, specs, payloads ======================================================


def update_header_messages() -> st.SearchStrategy[pb.UpdateHeader]:
    return st.one_of(messages_like(mlp_update_header()), wire_update_headers())


@given(message=st.deferred(update_header_messages), against_model=st.booleans())
def test_fuzz_update_header_from_proto(message: pb.UpdateHeader, against_model: bool) -> None:
    """DecodeError, or (checked against the model's specs first)
    MalformedUpdateError for the wrong number of specs; else a valid header."""
    expected = mlp_specs() if against_model else None
    allowed = MalformedUpdateError if against_model else DecodeError
    header = outcome(lambda: codec.update_header_from_proto(message, expected), allowed)
    if header is None:
        return
    assert 1 <= header.num_examples <= codec.MAX_NUM_EXAMPLES
    assert len(header.sha256) == 32
    assert isinstance(header.sha256, bytes)
    check_specs(header.specs)
    check_metrics(header.metrics)
    assert expected is None or len(header.specs) == len(expected)


@given(message=st.one_of(st.deferred(lambda: messages_like(mlp_model_header())),
                         wire_model_headers()))
def test_fuzz_model_header_from_proto(message: pb.ModelHeader) -> None:
    header = outcome(lambda: codec.model_header_from_proto(message), DecodeError)
    if header is not None:
        assert len(header.sha256) == 32
        check_specs(header.specs)
        check_metrics(header.metrics)


@given(request=st.deferred(lambda: messages_like(*small_requests("RegisterClientRequest"))))
def test_fuzz_specs_from_proto(request: pb.RegisterClientRequest) -> None:
    """A client's specs as the server reads them at registration: the count
    first (MalformedUpdateError), then each spec (DecodeError)."""
    if outcome(lambda: codec.check_spec_count(request.tensors, mlp_specs()),
               MalformedUpdateError) is None and len(request.tensors) != len(mlp_specs()):
        return
    assert len(request.tensors) == len(mlp_specs()), "check_spec_count let a wrong count by"
    specs = outcome(lambda: codec.specs_from_proto(request.tensors), DecodeError)
    if specs is not None:
        check_specs(specs)
        assert len(specs) == len(mlp_specs())


@given(message=messages_like(codec.plan_to_proto(codec.Plan("train", 2, 1, {"lr": 0.1}, 1)),
                             codec.plan_to_proto(codec.Plan("finished", 3, 3))))
def test_fuzz_plan_from_proto(message: pb.RoundAssignment) -> None:
    plan = outcome(lambda: codec.plan_from_proto(message), DecodeError)
    if plan is not None:
        assert plan.role in ("train", "wait", "finished")
        check_metrics(plan.config)


@given(message=messages_like(pb.EvaluationReport(client_id="a", round=1, num_examples=10,
                                                 metrics={"accuracy": 0.5})))
def test_fuzz_evaluation_report_from_proto(message: pb.EvaluationReport) -> None:
    report = outcome(lambda: codec.evaluation_report_from_proto(message), DecodeError)
    if report is not None:
        assert 1 <= report.num_examples <= codec.MAX_NUM_EXAMPLES
        check_metrics(report.metrics)


@pytest.mark.parametrize("cls", [pb.UpdateHeader, pb.ModelHeader], ids=lambda c: c.__name__)
@given(data=st.data())
def test_fuzz_parse_message(cls: type[Message], data: st.DataObject) -> None:
    """parse_message (the header of a state-dir file) raises DecodeError only."""
    base = mlp_update_header() if cls is pb.UpdateHeader else mlp_model_header()
    raw = data.draw(encodings_like(base))
    message = outcome(lambda: codec.parse_message(cls, raw), DecodeError)
    assert message is None or isinstance(message, cls)


@st.composite
def payload_streams(draw: st.DrawFn) -> tuple[codec.ModelSpec, bytes, list[bytes]]:
    """Specs (the mlp's, or small ones of any dtype), the SHA-256 the header
    claims, and the chunks that arrive: a payload with arbitrary bit patterns
    (NaN, Inf, bools above 1), maybe mutated, cut anywhere."""
    if draw(st.integers(0, 3)) == 0:
        specs = mlp_specs()
        payload = update_payload(specs, draw(st.sampled_from([0.0, 1.5, -2.0])))
    else:
        small = draw(entries(max_tensors=3, min_tensors=0))
        specs = tuple(codec.TensorSpec(n, d, s) for n, d, s in small)
        payload = b"".join(codec.tensor_view(draw(raw_tensors(d, s))) for _, d, s in small)
    digest = hashlib.sha256(payload).digest()
    if draw(st.booleans()):
        payload = draw(mutated_bytes(payload, hot=len(payload)))
    if draw(st.integers(0, 3)) == 0:
        digest = draw(st.binary(min_size=32, max_size=32))
    chunks = [payload[a:b] for a, b in draw(split_points(len(payload)))]
    return specs, digest, chunks


@given(stream=payload_streams())
def test_fuzz_payload_checker(stream: tuple[codec.ModelSpec, bytes, list[bytes]]) -> None:
    """PayloadChecker raises MalformedUpdateError only; what it accepts is
    exactly the declared size, matches the digest, and holds finite floats
    and bools of 0 or 1."""
    specs, digest, chunks = stream
    checker = codec.PayloadChecker(specs, digest)

    def check() -> bool:
        for chunk in chunks:
            checker.feed(memoryview(chunk))
        checker.finish()
        return True

    if not outcome(check, MalformedUpdateError):
        return
    payload = b"".join(chunks)
    assert len(payload) == codec.payload_size(specs)
    assert hashlib.sha256(payload).digest() == digest
    for name, tensor in codec.state_dict_from_payload(specs, payload).items():
        if tensor.dtype.is_floating_point:
            assert codec.all_finite(tensor), f"{name} holds NaN or Inf"
        if tensor.dtype == torch.bool:
            assert bytes(codec.tensor_view(tensor)).strip(b"\x00\x01") == b"", name


@given(data=st.data(), borrow=st.booleans())
def test_fuzz_state_dict_from_payload(data: st.DataObject, borrow: bool) -> None:
    """DecodeError for a payload that does not fit the specs; else tensors of
    exactly the specs holding exactly the payload's bytes."""
    small = data.draw(entries(max_tensors=4, min_tensors=0))
    specs = tuple(codec.TensorSpec(n, d, s) for n, d, s in small)
    valid = b"".join(codec.tensor_view(data.draw(raw_tensors(d, s))) for _, d, s in small)
    payload = data.draw(st.one_of(st.just(valid), mutated_bytes(valid), st.binary(max_size=64)))
    buffer = bytearray(payload) if borrow else payload
    out = outcome(lambda: codec.state_dict_from_payload(specs, buffer, borrow=borrow), DecodeError)
    if out is None:
        assert len(payload) != codec.payload_size(specs)
        return
    assert [(n, t.dtype, tuple(t.shape)) for n, t in out.items()] == [
        (s.name, s.dtype, s.shape) for s in specs]
    assert b"".join(bytes(codec.tensor_view(t)) for t in out.values()) == payload


# == 3. the state dir ================================================================


@functools.cache
def tiny_model_file() -> bytes:
    payload = payload_of(TINY)
    digest = hashlib.sha256(payload).digest()
    header = codec.ModelHeader(3, TINY_SPECS, digest, 2, 20, {"loss": 1.0})
    return b"".join(bytes(piece) for piece in state._model_file(header, payload))


@given(raw=st.one_of(st.binary(max_size=200), st.deferred(lambda: mutated_bytes(tiny_model_file())),
                     st.deferred(lambda: mutated_bytes(tiny_model_file(), hot=64)
                                 .map(lambda b: state.MODEL_MAGIC + b[len(state.MODEL_MAGIC):]))))
def test_fuzz_parse_model(raw: bytes) -> None:
    """A global model (or server state) file: DecodeError, or a model whose
    payload fits its specs and its digest."""
    stored = outcome(lambda: state.parse_model(raw), DecodeError)
    if stored is not None:
        check_specs(stored.header.specs)
        assert len(stored.payload) == codec.payload_size(stored.header.specs)
        assert hashlib.sha256(stored.payload).digest() == stored.header.sha256


def update_file(specs: codec.ModelSpec, client: str, round: int, value: float) -> bytes:
    payload = update_payload(specs, value)
    header = codec.UpdateHeader(client, round, 10, specs, hashlib.sha256(payload).digest(),
                                {"loss": value})
    encoded = codec.update_header_to_proto(header).SerializeToString()
    return spool.UPDATE_MAGIC + len(encoded).to_bytes(4, "little") + encoded + payload


TINY_UPDATE = update_file(TINY_SPECS, "a", 3, 0.5)
# The file of an update whose header's first spec says float64 (its dtype
# field's value byte turned from FLOAT32 to FLOAT64): it parses, but its specs
# are not the model's.
_FLOAT32_SPEC = codec.tensor_spec_to_proto(TINY_SPECS[0]).SerializeToString()
_FLOAT64_SPEC = codec.tensor_spec_to_proto(
    codec.TensorSpec(TINY_SPECS[0].name, torch.float64, TINY_SPECS[0].shape)).SerializeToString()
WRONG_DTYPE_UPDATE = TINY_UPDATE.replace(_FLOAT32_SPEC, _FLOAT64_SPEC, 1)
update_files = st.one_of(st.binary(max_size=120), mutated_bytes(TINY_UPDATE, hot=160),
                         st.just(TINY_UPDATE))


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A fresh directory for one example (function-scoped fixtures are not
    reset between hypothesis' examples)."""
    path = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@given(raw=update_files)
def test_fuzz_read_update_header(scratch: Path, raw: bytes) -> None:
    """The header of an update file (the published round's, read on resume):
    DecodeError or OSError, as documented."""
    with scratch_dir(scratch) as directory:
        path = directory / "a.update"
        path.write_bytes(raw)
        try:
            header = outcome(lambda: spool.read_update_header(path), DecodeError)
        except OSError:
            return
        if header is not None:
            check_specs(header.specs)
            assert len(header.sha256) == 32


@given(raw=update_files)
def test_fuzz_read_update(scratch: Path, raw: bytes) -> None:
    """An update file of the open round, read and verified on resume:
    DecodeError or OSError (then load_round discards it), or a valid update."""
    with scratch_dir(scratch) as directory:
        path = directory / "a.update"
        path.write_bytes(raw)
        try:
            update = outcome(lambda: spool.read_update(path, TINY_SPECS), DecodeError)
        except OSError:
            return
        if update is not None:
            assert update.header.specs == TINY_SPECS
            assert hashlib.sha256(raw[update.offset:]).digest() == update.header.sha256


@given(current=st.deferred(lambda: st.one_of(mutated_bytes(tiny_model_file()),
                                             st.binary(max_size=64),
                                             st.none())),
       previous=st.deferred(lambda: st.one_of(mutated_bytes(tiny_model_file()),
                                              st.just(tiny_model_file()), st.none())))
def test_fuzz_load_model(scratch: Path, current: bytes | None, previous: bytes | None) -> None:
    """load_model never raises: the newest intact model file, or None."""
    with scratch_dir(scratch) as directory:
        for name, raw in ((state.MODEL_FILE, current), (state.PREVIOUS_MODEL_FILE, previous)):
            if raw is not None:
                (directory / name).write_bytes(raw)
        store = state.StateDir(directory, durable=False)
        try:
            stored = store.load_model()
        finally:
            store.close()
        if stored is not None:
            assert hashlib.sha256(stored.payload).digest() == stored.header.sha256
            assert len(stored.payload) == codec.payload_size(stored.header.specs)


# -- resuming a whole state dir -------------------------------------------------------

OPEN_ROUND_DIR = "updates/round-00000003"
PUBLISHED_ROUND_DIR = "updates/round-00000002"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state dir of a server (the mlp model) stopped in round 3: models of
    rounds 2 and 1 (previous), the published round's updates, cohort and
    timing, the open round's cohort and one update of its two."""
    root = tmp_path_factory.mktemp("template") / "state"
    coordinator = Coordinator(ServerConfig(clients=2, state_dir=root, durable=False), mlp())
    try:
        coordinator.register("a")
        coordinator.register("b")
        for round in (1, 2):
            for i, name in enumerate("ab"):
                send(coordinator, name, round, round + i)
            model = coordinator.wait_for_model("a", round, lambda: 60.0)
            assert model is not None
            assert model.header.round == round
        send(coordinator, "a", 3, 5.0)
    finally:
        coordinator.close()
    assert (root / OPEN_ROUND_DIR / "a.update").exists()
    assert (root / state.PREVIOUS_MODEL_FILE).exists()
    return root


def send(coordinator: Coordinator, client: str, round: int, value: float) -> None:
    payload = update_payload(mlp_specs(), value)
    header = codec.UpdateHeader(client, round, 10, mlp_specs(), hashlib.sha256(payload).digest())
    coordinator.submit(header, [payload])


def resume(directory: Path) -> None:
    """A server started on `directory`: refused with our error, or running
    with a consistent model and no failure."""
    failures: list[BaseException] = []
    config = ServerConfig(clients=2, state_dir=directory, durable=False,
                          on_failure=failures.append)
    coordinator = outcome(lambda: Coordinator(config, mlp()), ParamServerError)
    if coordinator is None:
        return
    try:
        model = coordinator.model
        assert model.header.specs == mlp_specs()
        assert hashlib.sha256(model.payload).digest() == model.header.sha256
    finally:
        coordinator.close(timeout=60)
    assert not failures, failures


@contextlib.contextmanager
def copy_of(template: Path, scratch: Path) -> Iterator[Path]:
    with scratch_dir(scratch) as directory:
        root = directory / "state"
        shutil.copytree(template, root)
        yield root


BINARY_FILES = {
    "global.model": [state.MODEL_FILE],
    "global.model.prev": [state.PREVIOUS_MODEL_FILE],
    "open round's update": [f"{OPEN_ROUND_DIR}/a.update", f"{OPEN_ROUND_DIR}/b.update"],
    "published round's update": [f"{PUBLISHED_ROUND_DIR}/a.update"],
}


@pytest.mark.parametrize("kind", list(BINARY_FILES))
@SLOWER
@given(data=st.data())
def test_fuzz_resume_from_corrupt_binary_file(template: Path, scratch: Path, kind: str,
                                              data: st.DataObject) -> None:
    """A model or update file changed at the byte level (or replaced by junk,
    or from another client or round): the server resumes (falling back to the
    previous model, discarding the update) or refuses with our error."""
    name = data.draw(st.sampled_from(BINARY_FILES[kind]))
    with copy_of(template, scratch) as root:
        path = root / name
        source = path if path.exists() else root / OPEN_ROUND_DIR / "a.update"
        base = source.read_bytes()
        path.write_bytes(data.draw(st.one_of(mutated_bytes(base), st.binary(max_size=64)),
                                   label=name))
        resume(root)


@functools.cache
def run_record() -> dict[str, object]:
    """What run.json holds for the mlp model and FedAvg (Coordinator._resume)."""
    return {"initial_sha256": hashlib.sha256(payload_of(mlp())).hexdigest(),
            "tensors": len(mlp_specs()), "strategy": repr(ServerConfig().strategy)}


# Each resume file: where it is (the open round's or the published round's),
# and what it holds in the template or would (closed.json and the abort
# markers are written only at a deadline or an abort).
JSON_FILES: dict[str, tuple[list[str], st.SearchStrategy[bytes]]] = {
    "run.json": ([state.RUN_FILE], st.deferred(lambda: json_files(run_record()))),
    "clients.json": ([state.CLIENTS_FILE], json_files({"a": 1, "b": 1})),
    "cohort.json": ([f"{OPEN_ROUND_DIR}/cohort.json", f"{PUBLISHED_ROUND_DIR}/cohort.json"],
                    json_files({"round": 3, "cohort": ["a", "b"]})),
    "closed.json": ([f"{OPEN_ROUND_DIR}/closed.json"],
                    json_files({"round": 3, "clients": ["a"]})),
    "timing.json": ([f"{OPEN_ROUND_DIR}/timing.json", f"{PUBLISHED_ROUND_DIR}/timing.json"],
                    json_files({"round": 3, "fastest": 0.012})),
    "aborted": (["updates/round-00000003.aborted", "updates/round-00000004.aborted"],
                json_files({"round": 3})),
}


@pytest.mark.parametrize("file", list(JSON_FILES))
@SLOWER
@given(data=st.data())
def test_fuzz_resume_from_corrupt_json_file(template: Path, scratch: Path, file: str,
                                            data: st.DataObject) -> None:
    """A resume file (run, clients, cohort, closed, timing, abort marker)
    mutated as a document or as bytes, or nested deeper than any parser
    recurses: the server resumes, or refuses with our error (StateDirError),
    never another."""
    names, documents = JSON_FILES[file]
    with copy_of(template, scratch) as root:
        path = root / data.draw(st.sampled_from(names), label="path")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.draw(documents, label=file))
        resume(root)


# == 4. credentials ======================================================================

TOKEN_TEXT = st.one_of(st.text(max_size=80), st.text(alphabet=string.printable, max_size=600),
                       st.sampled_from(["a:", ":x", "a:x", "a:" + "x" * MAX_TOKEN_LENGTH]))


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A state dir with a and b enrolled, and their tokens."""
    root = tmp_path_factory.mktemp("tokens")
    store = TokenStore(root)
    return root, {name: store.add(name) for name in ("a", "b")}


@given(data=st.data())
def test_fuzz_token_verify(enrolled: tuple[Path, dict[str, str]], data: st.DataObject) -> None:
    """verify never raises and names a client only for exactly its token."""
    root, tokens = enrolled
    token = data.draw(st.one_of(TOKEN_TEXT, st.sampled_from(sorted(tokens.values())),
                                st.sampled_from(sorted(tokens.values())).flatmap(
                                    lambda t: mutated_bytes(t.encode()).map(
                                        lambda b: b.decode(errors="replace")))))
    name = TokenStore(root).verify(token)
    assert name is None or tokens[name] == token, (token, name)


@given(data=st.data())
def test_fuzz_tokens_file(enrolled: tuple[Path, dict[str, str]], scratch: Path,
                          data: st.DataObject) -> None:
    """A damaged tokens.json: TokenFileError when read, never another error;
    a server's call gets UNAVAILABLE (CredentialsUnavailableError)."""
    root, tokens = enrolled
    base = json.loads((root / "tokens.json").read_text())
    raw = data.draw(json_files(base))
    with scratch_dir(scratch) as directory:
        (directory / "tokens.json").write_bytes(raw)
        authenticator = security.authenticator_for(False, directory)
        metadata = [(security.AUTH_METADATA, security.BEARER + tokens["a"])]
        principal = outcome(lambda: authenticator.principal(metadata, {}),
                            UnauthenticatedError, CredentialsUnavailableError)
        assert principal in (None, "a")
        names = outcome(lambda: TokenStore(directory).names(), TokenFileError)
        assert names is None or all(isinstance(n, str) for n in names)


metadata_values = st.one_of(TOKEN_TEXT, st.binary(max_size=40))
metadata_keys = st.sampled_from([security.AUTH_METADATA, "x-other", "authorization-bin"])


@given(enrolled_metadata=st.lists(st.tuples(metadata_keys, metadata_values), max_size=3),
       prefix=st.sampled_from(["", security.BEARER, "bearer ", security.BEARER + " "]),
       names=st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=5)), max_size=2))
def test_fuzz_principals(enrolled: tuple[Path, dict[str, str]],
                         enrolled_metadata: list[tuple[str, str | bytes]], prefix: str,
                         names: list[Any]) -> None:
    """Whatever a call's metadata and auth context hold: a client name or
    UnauthenticatedError, from each authenticator."""
    root, tokens = enrolled
    metadata = [(k, prefix + v if isinstance(v, str) else v) for k, v in enrolled_metadata]
    context = {security.COMMON_NAME: names}
    for authenticator in (security.Open(), security.Tokens(TokenStore(root)),
                          security.Certificates()):
        principal = outcome(lambda a=authenticator: a.principal(metadata, context),  # type: ignore[misc]
                            UnauthenticatedError)
        assert principal is None or isinstance(principal, str)
        if isinstance(authenticator, security.Tokens) and principal is not None:
            assert any(v == security.BEARER + tokens[principal] for k, v in metadata
                       if k == security.AUTH_METADATA)


@pytest.mark.parametrize("name", list(LENIENT))
@given(data=st.data())
def test_fuzz_claimed_name(name: str, data: st.DataObject) -> None:
    """The client a request acts for: a str or None, never an error."""
    request = data.draw(messages_like(*small_requests(name)))
    claimed = security.claimed_name(request)
    assert claimed is None or isinstance(claimed, str)
    outcome(lambda: security.check_identity("a", claimed), PermissionDeniedError)


# == 5. secure aggregation ===================================================================

Q = Quantization(bits=32, frac_bits=8, clip=100.0)
CONTEXT = b"paramserver fuzz round"
THRESHOLD = 3
VECTOR = 6


@functools.cache
def secure_round() -> dict[str, Any]:
    """One round of four clients run to the unmasking (d drops after sharing
    its keys), deterministic: the roster, the boxes, the masked vectors, the
    reveals and the plain sum they must unmask to."""
    import numpy as np

    from paramserver.secagg import SecAggClient

    rng = seeded("secure-round")
    clients = {n: SecAggClient(n, CONTEXT, Q, rng) for n in "abcd"}
    roster = {n: c.advertise() for n, c in clients.items()}
    boxes = {n: c.share_keys(roster, THRESHOLD) for n, c in clients.items()}
    updates = {n: np.arange(VECTOR, dtype=np.uint64) * (i + 1) for i, n in enumerate("abc")}
    masked = {n: clients[n].mask(updates[n], {s: boxes[s][n] for s in boxes if s != n})
              for n in updates}
    reveals = {n: clients[n].reveal(set(updates), {"d"}) for n in updates}
    total = sum(updates.values()) % (1 << Q.bits)
    return {"clients": clients, "roster": roster, "boxes": boxes, "masked": masked,
            "reveals": reveals, "sum": total}


@given(raw=st.one_of(st.binary(max_size=200), st.binary(min_size=shamir.SHARE_SIZE,
                                                         max_size=shamir.SHARE_SIZE),
                     st.just(b"\xff" * shamir.SHARE_SIZE)))
def test_fuzz_share_from_bytes(raw: bytes) -> None:
    share = outcome(lambda: shamir.share_from_bytes(raw), SecAggError)
    if share is not None:
        assert shamir.share_to_bytes(share) == raw


@given(raw=st.one_of(st.binary(max_size=100), st.binary(min_size=ADVERT_SIZE,
                                                         max_size=ADVERT_SIZE)))
def test_fuzz_advert_from_bytes(raw: bytes) -> None:
    advert = outcome(lambda: advert_from_bytes(raw), SecAggError)
    assert advert is None or advert.c_pk + advert.s_pk == raw


@given(data=st.data())
def test_fuzz_open_shares(data: st.DataObject) -> None:
    """A box from b to a changed anywhere: SecAggError, or (unchanged) the
    shares b sealed."""
    rng = seeded("boxes")
    key = rng(KEY_SIZE)
    shares = (shamir.Share(1, 5), shamir.Share(1, 7))
    box = seal_shares(key, CONTEXT, "b", "a", *shares, rng=rng)
    raw = data.draw(st.one_of(mutated_bytes(box), st.binary(max_size=200),
                              st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE + 40)))
    sender = data.draw(st.sampled_from(["b", "b", "c"]))
    opened = outcome(lambda: open_shares(key, CONTEXT, sender, "a", raw), SecAggError)
    if opened is not None:
        assert (raw, sender, opened) == (box, "b", shares)


@functools.cache
def secagg_bases() -> dict[str, Message]:
    state = secure_round()
    adverts = state["roster"]
    roster = secagg_codec.Roster(adverts, THRESHOLD, CONTEXT, b"", {})
    return {"roster": secagg_codec.roster_to_proto(roster),
            "boxes": secagg_codec.boxes_to_proto(state["boxes"]["a"]),
            "included": secagg_codec.included_to_proto(frozenset("abc"), frozenset("d")),
            "reveal": secagg_codec.reveal_to_proto(state["reveals"]["a"]),
            "settings": secagg_codec.settings_to_proto(Q, 0),
            "names": secagg_codec.names_to_proto(frozenset("abc")),
            "advert": secagg_codec.advert_to_proto("a", 1, adverts["a"])}


SECAGG_DECODERS: dict[str, Callable[[Any], object]] = {
    "roster": lambda m: secagg_codec.roster_from_proto(m, 0),
    "boxes": lambda m: secagg_codec.boxes_from_proto(m.ciphertexts),
    "included": secagg_codec.included_from_proto,
    "reveal": secagg_codec.reveal_from_proto,
    "settings": secagg_codec.settings_from_proto,
    "names": secagg_codec.names_from_proto,
    "advert": secagg_codec.advert_from_proto,
}


@pytest.mark.parametrize("kind", list(SECAGG_DECODERS))
@given(data=st.data())
def test_fuzz_secagg_codec(kind: str, data: st.DataObject) -> None:
    """Every *_from_proto of secure aggregation raises SecAggError only."""
    message = data.draw(messages_like(secagg_bases()[kind]))
    outcome(lambda: SECAGG_DECODERS[kind](message), SecAggError)


@given(data=st.data())
def test_fuzz_share_keys_with_a_hostile_roster(data: st.DataObject) -> None:
    """A client given a changed roster (by the server): SecAggError, or boxes
    for exactly the other clients of the roster."""
    from paramserver.secagg import SecAggClient

    message: Any = data.draw(mutated(secagg_bases()["roster"]))
    roster = outcome(lambda: secagg_codec.roster_from_proto(message, 0), SecAggError)
    if roster is None:
        return
    client = SecAggClient("a", CONTEXT, Q, seeded("hostile-roster"))
    # The client's own advert replaces the template's "a" where it is listed.
    clients = {n: (client.advertise() if n == "a" else adv) for n, adv in roster.clients.items()}
    boxes = outcome(lambda: client.share_keys(clients, roster.threshold, context=roster.context),
                    SecAggError)
    assert boxes is None or set(boxes) == set(clients) - {"a"}


@given(data=st.data())
def test_fuzz_unmask_with_hostile_reveals(data: st.DataObject) -> None:
    """Reveals changed by a client (shares flipped, dropped, swapped, added):
    the exact sum, or SecAggError naming the tampering; never a wrong sum
    without an error, never another exception."""
    from paramserver.secagg import unmask

    state = secure_round()
    reveals = dict(state["reveals"])
    who = data.draw(st.sampled_from(sorted(reveals)))
    message = data.draw(mutated(secagg_codec.reveal_to_proto(reveals[who])))
    reveal = outcome(lambda: secagg_codec.reveal_from_proto(message), SecAggError)
    if reveal is None:
        return
    reveals[who] = reveal
    total = outcome(lambda: unmask(state["masked"], state["roster"], set("abcd"), reveals,
                                   THRESHOLD, CONTEXT, Q), SecAggError)
    if total is not None:
        assert (total == state["sum"]).all()


# == 6. a live server, every RPC ==============================================================

DEADLINE = 0.25  # long polls time out; DEADLINE_EXCEEDED is a fine answer to a fuzzed call
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@functools.cache
def tiny_update() -> tuple[pb.UpdateHeader, bytes]:
    payload = update_payload(TINY_SPECS, 0.5)
    header = codec.UpdateHeader("a", 1, 10, TINY_SPECS, hashlib.sha256(payload).digest())
    return codec.update_header_to_proto(header), payload


@functools.cache
def rpc_bases() -> dict[str, tuple[Message, ...]]:
    """Valid requests of each RPC (a stream's messages in order)."""
    header, payload = tiny_update()
    register = pb.RegisterClientRequest(client_name="a", tensors=codec.specs_to_proto(TINY_SPECS))
    fetch = pb.GetAveragedModelRequest(client_id="a", round=1)
    message = pb.UpdateMessage(header=header, data=payload)
    return {
        "RegisterClient": (register,),
        "SendUpdate": (pb.SendUpdateRequest(header=header), pb.SendUpdateRequest(data=payload)),
        "GetAveragedModel": (fetch,),
        "SendUpdateUnary": (message,),
        "GetAveragedModelUnary": (fetch,),
        "ExchangeUnary": (message,),
        "NextRound": (pb.NextRoundRequest(client_id="a", after_round=0),),
        "ReportEvaluation": small_requests("EvaluationReport"),
        "SecureAggregation": secagg_client_messages(),
    }


@st.composite
def rpc_calls(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """A method and the messages of its call: the valid ones, each maybe
    mutated, dropped, repeated or replaced by bytes."""
    method = draw(st.sampled_from(sorted(rpc_bases())))
    messages = []
    for base in rpc_bases()[method]:
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue
        messages.append(draw(encodings_like(base)) if choice == 1 else
                        draw(mutated(base)).SerializeToString())
    if method in ("SendUpdate", "SecureAggregation") and draw(st.booleans()):
        messages = messages * draw(st.integers(1, 3))
    return method, messages or [b""]


def call(channel: grpc.Channel, method: str, messages: list[bytes],
         metadata: Sequence[tuple[str, str]], timeout: float = DEADLINE) -> grpc.StatusCode:
    """The status of the call (no serializer: bytes as they are)."""
    path = wire.method_path(method)
    rpc = next(m for m in wire.SERVICE.methods if m.name == method)
    options: dict[str, Any] = {"timeout": timeout, "metadata": metadata}
    multi: Any  # no serializers: bytes in, bytes out
    try:
        if rpc.client_streaming and rpc.server_streaming:
            multi = channel.stream_stream(path)
            list(multi(iter(messages), **options))
        elif rpc.client_streaming:
            multi = channel.stream_unary(path)
            multi(iter(messages), **options)
        elif rpc.server_streaming:
            multi = channel.unary_stream(path)
            list(multi(messages[0], **options))
        else:
            multi = channel.unary_unary(path)
            multi(messages[0], **options)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


class Live:
    def __init__(self, running: RunningServer, tokens: dict[str, str],
                 failures: list[BaseException]) -> None:
        self.running, self.tokens, self.failures = running, tokens, failures
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")

    def healthy(self) -> None:
        """Still serving: health answers and nothing failed."""
        stub: Any = health_pb2_grpc.HealthStub(self.channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert not self.failures, self.failures


@contextlib.contextmanager
def live_server(root: Path, secure: bool) -> Iterator[Live]:
    failures: list[BaseException] = []
    tokens = {}
    if secure:  # tokens on, secure aggregation on
        store = TokenStore(root)
        tokens = {name: store.add(name) for name in ("a", "b")}
    config = ServerConfig(
        clients=2, capacity=16, state_dir=root, durable=False, on_failure=failures.append,
        round_timeout=30.0 if secure else None,
        secagg=SecAggSettings(Quantization(), stage_timeout=30.0) if secure else None)
    running = create_server(config, TINY)
    live = Live(running, tokens, failures)
    try:
        # "a" is registered, so that valid requests get past NOT_FOUND.
        register = rpc_bases()["RegisterClient"][0].SerializeToString()
        metadata = [(security.AUTH_METADATA, security.BEARER + tokens["a"])] if secure else []
        assert call(live.channel, "RegisterClient", [register], metadata,
                    timeout=30) == grpc.StatusCode.OK
        yield live
    finally:
        live.channel.close()
        running.stop(grace=0)


@pytest.fixture(scope="module", params=["open", "tokens+secagg"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[Live]:
    with live_server(tmp_path_factory.mktemp("live"), request.param != "open") as server:
        yield server
        server.healthy()


@settings(max_examples=scaled(4), suppress_health_check=[HealthCheck.too_slow])
@given(request=rpc_calls(), credential=st.sampled_from(["a", "b", "none", "wrong"]))
def test_fuzz_live_server(live: Live, request: tuple[str, list[bytes]], credential: str,
                          ) -> None:
    """Hostile requests on every RPC, with and without a valid token: never
    INTERNAL or UNKNOWN, and the server keeps serving."""
    method, messages = request
    metadata: list[tuple[str, str]] = []
    if live.tokens and credential != "none":
        token = live.tokens.get(credential, "a:wrong")
        metadata = [(security.AUTH_METADATA, security.BEARER + token)]
    code = call(live.channel, method, messages, metadata)
    event(f"{method}: {code.name}")  # --hypothesis-show-statistics shows how deep calls got
    assert code not in BAD_CODES, (method, messages, credential, code)
    assert not live.failures, live.failures
