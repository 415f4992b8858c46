"""Properties of paramserver.wire: its encoding is protobuf's, its decoding
agrees with protobuf's on every input (standard, merged, reordered, hostile),
and the payload it hands out is a view of the received bytes."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from property_strategies import wire_model_headers, wire_update_headers

from paramserver import codec, wire
from paramserver.v1 import parameter_server_pb2 as pb

pytestmark = pytest.mark.timeout(method="thread")

# (message, its header's type, a strategy for headers): the four layouts.
LAYOUTS = {
    "UpdateMessage": (pb.UpdateMessage, pb.UpdateHeader, wire_update_headers()),
    "SendUpdateRequest": (pb.SendUpdateRequest, pb.UpdateHeader, wire_update_headers()),
    "ModelMessage": (pb.ModelMessage, pb.ModelHeader, wire_model_headers()),
    "GetAveragedModelResponse": (pb.GetAveragedModelResponse, pb.ModelHeader,
                                 wire_model_headers()),
}
payloads = st.binary(max_size=300)


@st.composite
def messages(draw: st.DrawFn, layout: str) -> Message:
    """A message of the layout, built with protobuf: header, data, both
    (a oneof keeps the last one set) or neither."""
    message_cls, _, headers = LAYOUTS[layout]
    message: Any = message_cls()  # one of the four layouts
    for part in draw(st.lists(st.sampled_from(["header", "data"]), max_size=2, unique=True)):
        if part == "header":
            message.header.CopyFrom(draw(headers))
        else:
            message.data = draw(payloads)
    built: Message = message
    return built


def protobuf_parts(message_cls: type[Message], raw: bytes) -> tuple[Any, bytes | None] | None:
    """What protobuf makes of `raw`, as (header or None, data or None); None if
    it refuses it."""
    try:
        message: Any = message_cls.FromString(raw)
    except (ProtobufDecodeError, RuntimeWarning, ValueError):
        return None
    header = message.header if message.HasField("header") else None
    oneof = message_cls.DESCRIPTOR.fields_by_name["data"].containing_oneof is not None
    has_data = not oneof or message.WhichOneof("part") == "data"
    return header, (message.data if has_data else None)


def decoded(layout: str, raw: bytes) -> tuple[Any, bytes | None] | None:
    message_cls, header_cls, _ = LAYOUTS[layout]
    parts: wire.Parts[Any] = wire.Decoder(message_cls, header_cls)(raw)
    if parts.error is not None:
        assert message_cls.__name__ in parts.error
        return None
    return parts.header, (None if parts.data is None else bytes(parts.data))


layouts = st.sampled_from(sorted(LAYOUTS))


@given(st.data(), layouts)
def test_decoding_agrees_with_protobuf_on_its_encoding(data: st.DataObject, layout: str) -> None:
    raw = data.draw(messages(layout)).SerializeToString()
    assert decoded(layout, raw) == protobuf_parts(LAYOUTS[layout][0], raw)


@given(st.data(), layouts, st.lists(st.integers(0, 2), min_size=1, max_size=4))
def test_decoding_agrees_with_protobuf_on_any_concatenation(
        data: st.DataObject, layout: str, order: list[int]) -> None:
    """Concatenated messages are one message to protobuf (fields merged, the
    last scalar wins, a oneof keeps its last member); fields come out of order,
    repeated, or with an unknown field (number 7) among them."""
    fragments = [data.draw(messages(layout)).SerializeToString() for _ in range(2)]
    fragments.append(b"\x3a\x03abc")  # field 7, length-delimited: unknown
    raw = b"".join(fragments[i] for i in order)
    assert decoded(layout, raw) == protobuf_parts(LAYOUTS[layout][0], raw)


@given(layouts, st.binary(max_size=64))
def test_hostile_bytes_are_refused_or_read_as_protobuf_reads_them(layout: str,
                                                                  raw: bytes) -> None:
    """Never raises (gRPC would answer INTERNAL); an error names the message."""
    assert decoded(layout, raw) == protobuf_parts(LAYOUTS[layout][0], raw)


@given(st.data(), layouts, st.lists(payloads, max_size=4), st.booleans())
def test_encoding_is_protobufs(data: st.DataObject, layout: str, pieces: list[bytes],
                               with_header: bool) -> None:
    """`encode` from pieces parses, with protobuf, to the message protobuf
    itself builds from the joined pieces."""
    message_cls, _, headers = LAYOUTS[layout]
    oneof = message_cls.DESCRIPTOR.fields_by_name["data"].containing_oneof is not None
    header = data.draw(headers) if with_header else None
    expected: Any = message_cls()
    if header is not None:
        expected.header.CopyFrom(header)
    if not (oneof and header is not None):  # a oneof carries one of the two
        expected.data = b"".join(pieces)
        raw = wire.encode(header, [memoryview(p) for p in pieces])
    else:
        raw = wire.encode(header, None)
    assert message_cls.FromString(raw) == expected
    assert decoded(layout, raw) == protobuf_parts(message_cls, raw)


@given(wire_update_headers(), st.binary(max_size=200), st.integers(1, 64))
def test_stream_is_the_protobuf_stream(header: pb.UpdateHeader, payload: bytes,
                                       chunk_size: int) -> None:
    """wire.stream sends what codec.update_requests builds, message for message."""
    encoded = [pb.SendUpdateRequest.FromString(raw)
               for raw in wire.stream(header, [payload], chunk_size)]
    built = [pb.SendUpdateRequest(header=header)]
    built += [pb.SendUpdateRequest(data=chunk) for chunk in codec.iter_chunks([payload],
                                                                               chunk_size)]
    assert encoded == built


@given(wire_model_headers(), st.binary(min_size=1, max_size=200))
def test_the_payload_is_a_view_of_the_received_bytes(header: pb.ModelHeader,
                                                     payload: bytes) -> None:
    raw = pb.ModelMessage(header=header, data=payload).SerializeToString()
    parts = wire.Decoder(pb.ModelMessage, pb.ModelHeader)(raw)
    assert parts.data is not None
    assert parts.data.obj is raw
    assert parts.data == payload
    assert parts.header == header
