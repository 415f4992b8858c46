"""The payload-carrying messages as bytes on the wire, without protobuf's copies.

SendUpdateRequest and GetAveragedModelResponse (a oneof of header = 1 and
data = 2) and UpdateMessage and ModelMessage (header = 1 and data = 2) share one
layout. protobuf's Python API copies a bytes field when it parses it, on every
read, when it builds the message and when it serializes it: about four copies
of every payload byte on each side. `encode` writes the standard encoding
straight from the tensors' memory, in one copy (into the bytes gRPC sends), and
a `Decoder` hands the payload out as a view of the received buffer, with no
copy at all.

Any encoding the fast path does not expect (fields out of order or repeated,
unknown fields: all valid protobuf) goes through protobuf itself, so that every
conforming peer still works; a buffer that does not parse becomes a `Parts`
with an `error`, for the servicer to refuse with INVALID_ARGUMENT (gRPC answers
INTERNAL if a deserializer raises).

Imports the generated messages; must not import grpc or do any I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from paramserver.codec import Buffer, chunk_pieces
from paramserver.v1 import parameter_server_pb2 as pb

HEADER_FIELD, DATA_FIELD = 1, 2
_LENGTH_DELIMITED = 2
HEADER_TAG = bytes([HEADER_FIELD << 3 | _LENGTH_DELIMITED])
DATA_TAG = bytes([DATA_FIELD << 3 | _LENGTH_DELIMITED])
_MAX_VARINT_BYTES = 10

H = TypeVar("H", bound=Message)

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]


def method_path(method: str) -> str:
    """The gRPC path of one of the service's methods."""
    return f"/{SERVICE.full_name}/{SERVICE.methods_by_name[method].name}"


@dataclass(frozen=True)
class Parts(Generic[H]):
    """A received message: its header if it carried one, its payload (a view of
    the received buffer) if it carried one, or why it could not be parsed."""

    header: H | None = None
    data: memoryview | None = None
    error: str | None = None


@dataclass(frozen=True)
class Unparseable:
    """A request that did not parse, for the servicer to refuse."""

    error: str


M = TypeVar("M", bound=Message)


def lenient(message_cls: type[M]) -> Callable[[bytes], M | Unparseable]:
    """A deserializer for `message_cls` that never raises (gRPC answers
    INTERNAL if a deserializer raises): bytes that do not parse, e.g. a
    truncated field or a string that is not UTF-8, become an Unparseable."""

    def parse(raw: bytes) -> M | Unparseable:
        try:
            return message_cls.FromString(raw)
        except Exception as error:  # any parse failure: the peer sent bad bytes
            return Unparseable(f"cannot parse {message_cls.__name__}: {error}")

    return parse


def encode(header: Message | None, data: Sequence[Buffer] | None) -> bytes:
    """The standard encoding of a message with this header (None: absent) and
    the concatenation of `data` as its payload (None: absent)."""
    pieces: list[Buffer] = []
    if header is not None:
        raw = header.SerializeToString()
        pieces += [HEADER_TAG, _varint(len(raw)), raw]
    if data is not None:
        pieces += [DATA_TAG, _varint(sum(memoryview(d).nbytes for d in data)), *data]
    return b"".join(pieces)


def encoded(message: bytes) -> bytes:
    """The serializer for messages `encode` already encoded."""
    return message


class Decoder(Generic[H]):
    """Parses `message_cls` (one of the four layouts above) into Parts whose
    header is a `header_cls`. Never raises: gRPC calls it as a deserializer."""

    def __init__(self, message_cls: type[Message], header_cls: type[H]) -> None:
        fields = message_cls.DESCRIPTOR.fields_by_name
        if (fields["header"].number, fields["data"].number) != (HEADER_FIELD, DATA_FIELD):
            raise TypeError(f"{message_cls.__name__} does not have the header/data layout")
        self._message_cls = message_cls
        self._header_cls = header_cls
        # In a oneof, presence is on the wire; otherwise an absent payload is empty.
        self._oneof = fields["data"].containing_oneof is not None

    def __call__(self, raw: bytes) -> Parts[H]:
        spans = _scan(raw)
        if spans is None or (self._oneof and None not in spans):
            return self._parse_with_protobuf(raw)
        header_span, data_span = spans
        header = None
        if header_span is not None:
            try:
                header = self._header_cls.FromString(raw[header_span[0]:header_span[1]])
            except Exception as error:  # any parse failure: the peer sent bad bytes
                return self._unparseable(error)
        if data_span is not None:
            data: memoryview | None = memoryview(raw)[data_span[0]:data_span[1]]
        else:
            data = None if self._oneof else memoryview(b"")
        return Parts(header, data)

    def _parse_with_protobuf(self, raw: bytes) -> Parts[H]:
        try:
            message: Any = self._message_cls.FromString(raw)  # one of the four layouts
        except Exception as error:  # any parse failure: the peer sent bad bytes
            return self._unparseable(error)
        header = message.header if message.HasField("header") else None
        has_data = not self._oneof or message.WhichOneof("part") == "data"
        return Parts(header, memoryview(message.data) if has_data else None)

    def _unparseable(self, error: Exception) -> Parts[H]:
        return Parts(error=f"cannot parse {self._message_cls.__name__}: {error}")


def _scan(raw: bytes) -> tuple[tuple[int, int] | None, tuple[int, int] | None] | None:
    """The (start, end) of the header's and the payload's bytes, if `raw` is
    nothing but each of them at most once, header first; else None."""
    spans: list[tuple[int, int] | None] = [None, None]
    position, expected = 0, HEADER_FIELD
    while position < len(raw):
        tag = raw[position]
        field = tag >> 3
        if tag & 7 != _LENGTH_DELIMITED or field < expected or field > DATA_FIELD:
            return None
        length, start = _read_varint(raw, position + 1)
        if length is None or start + length > len(raw):
            return None
        spans[field - 1] = (start, start + length)
        position, expected = start + length, field + 1
    return spans[0], spans[1]


def _read_varint(raw: bytes, position: int) -> tuple[int | None, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if position + i >= len(raw):
            return None, position
        byte = raw[position + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, position + i + 1
    return None, position


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def stream(header: Message, views: Sequence[Buffer], chunk_size: int) -> Iterator[bytes]:
    """A SendUpdate or GetAveragedModel stream, encoded: the header, then the
    payload cut as `codec.iter_chunks` cuts it."""
    yield encode(header, None)
    for pieces in chunk_pieces(views, chunk_size):
        yield encode(None, pieces)
