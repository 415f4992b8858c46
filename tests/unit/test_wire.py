"""paramserver.wire on hand-picked encodings; the properties are in
tests/property/test_prop_wire.py."""

from paramserver import wire
from paramserver.v1 import parameter_server_pb2 as pb

HEADER = pb.UpdateHeader(client_id="c", round=3)
CHUNKS = wire.Decoder(pb.SendUpdateRequest, pb.UpdateHeader)
UPDATES = wire.Decoder(pb.UpdateMessage, pb.UpdateHeader)


def header_field() -> bytes:
    return pb.SendUpdateRequest(header=HEADER).SerializeToString()


def data_field(data: bytes) -> bytes:
    return pb.SendUpdateRequest(data=data).SerializeToString()


def both(parts: wire.Parts[pb.UpdateHeader]) -> tuple[pb.UpdateHeader | None, bytes | None]:
    return parts.header, None if parts.data is None else bytes(parts.data)


def test_a_oneof_keeps_the_member_set_last() -> None:
    assert both(CHUNKS(header_field() + data_field(b"xy"))) == (None, b"xy")
    assert both(CHUNKS(data_field(b"xy") + header_field())) == (HEADER, None)


def test_a_message_with_both_fields_keeps_both_in_any_order() -> None:
    for raw in (header_field() + data_field(b"xy"), data_field(b"xy") + header_field()):
        assert both(UPDATES(raw)) == (HEADER, b"xy")


def test_absent_fields() -> None:
    assert UPDATES(b"") == wire.Parts(None, memoryview(b""))  # proto3: empty bytes
    assert CHUNKS(b"") == wire.Parts()  # a oneof with no member set


def test_repeated_data_keeps_the_last_and_repeated_headers_merge() -> None:
    assert both(UPDATES(data_field(b"a") + data_field(b"bc"))) == (None, b"bc")
    other = pb.UpdateHeader(num_examples=7).SerializeToString()
    merged = UPDATES(header_field() + b"\x0a" + bytes([len(other)]) + other)
    assert merged.header == pb.UpdateHeader(client_id="c", round=3, num_examples=7)


def test_a_length_past_the_end_is_an_error_naming_the_message() -> None:
    parts = UPDATES(b"\x12\x05ab")
    assert parts.error is not None
    assert "cannot parse UpdateMessage" in parts.error
    assert parts.header is None
    assert parts.data is None


def test_encode_writes_the_payload_from_its_pieces() -> None:
    raw = wire.encode(HEADER, [b"ab", memoryview(b"cde")])
    assert pb.UpdateMessage.FromString(raw) == pb.UpdateMessage(header=HEADER, data=b"abcde")
    assert wire.encode(None, [b"ab"]) == data_field(b"ab")


def test_method_paths_come_from_the_proto() -> None:
    assert wire.method_path("ExchangeUnary") == "/paramserver.v1.ParameterServer/ExchangeUnary"
