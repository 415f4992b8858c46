"""Properties of the wire format (paramserver.codec): bit-exact round trips,
the streaming PayloadChecker, and decoding hostile bytes."""

from __future__ import annotations

import hashlib
import itertools
import math
import struct

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from property_strategies import (
    FLOAT_DTYPES,
    Entry,
    StateDict,
    entries,
    finite_state_dicts,
    model_headers,
    numel,
    raw_tensors,
    split_points,
    tensor_bytes,
    update_headers,
    valid_model_specs,
    wire_model_headers,
    wire_tensor_specs,
    wire_update_headers,
)

from paramserver import codec
from paramserver.errors import DecodeError, MalformedUpdateError, ParamServerError
from paramserver.v1 import parameter_server_pb2 as pb

# pytest-timeout's default signal method does not end a hang inside a
# hypothesis test: hypothesis catches the timeout as a failure and shrinks it,
# re-running the hanging example with no second alarm. The thread method
# always ends the run (with every thread's stack). The limit stays the global one.
pytestmark = pytest.mark.timeout(method="thread")

chunk_sizes = st.one_of(st.integers(1, 64), st.sampled_from([codec.MAX_CHUNK_SIZE]))


@st.composite
def raw_state_dicts(draw: st.DrawFn) -> StateDict:
    """Every supported dtype, arbitrary bits, 0-d and empty tensors, and
    sometimes a non-contiguous (transposed) tensor."""
    out: StateDict = {}
    for name, dtype, shape in draw(entries(codec.SUPPORTED_DTYPES, max_tensors=5)):
        tensor = draw(raw_tensors(dtype, shape))
        if tensor.dim() >= 2 and draw(st.booleans()):
            tensor = tensor.transpose(0, 1)
        out[name] = tensor
    return out


def payload_of(state_dict: StateDict) -> bytes:
    return b"".join(bytes(v) for v in codec.payload_views(state_dict))


# -- round trips -----------------------------------------------------------------


@given(raw_state_dicts(), chunk_sizes)
def test_payload_round_trip_is_bit_exact(state_dict: StateDict, chunk_size: int) -> None:
    specs = codec.spec_of(state_dict)
    chunks = list(codec.iter_chunks(codec.payload_views(state_dict), chunk_size))
    total = codec.payload_size(specs)
    # Chunks of exactly chunk_size, the last one possibly shorter, none empty.
    assert sum(len(c) for c in chunks) == total
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert codec.payload_digest(chunks) == codec.state_dict_digest(state_dict)

    for borrow in (False, True):  # copies, or views into one buffer where aligned
        decoded = codec.state_dict_from_payload(specs, bytearray(b"".join(chunks)),
                                                borrow=borrow)
        assert list(decoded) == list(state_dict)
        for name, tensor in state_dict.items():
            assert decoded[name].dtype == tensor.dtype, name
            assert decoded[name].shape == tensor.shape, name
            assert tensor_bytes(decoded[name]) == tensor_bytes(tensor), name
        assert codec.spec_of(decoded) == specs


@given(st.sampled_from(FLOAT_DTYPES), st.data())
def test_nan_payload_bits_survive(dtype: torch.dtype, data: st.DataObject) -> None:
    """Every NaN bit pattern (sign, quiet or signalling, payload) comes back as is."""
    bits = dtype.itemsize * 8
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23,
                     torch.float64: 52}[dtype]
    exponent_all_ones = ((1 << (bits - 1 - mantissa_bits)) - 1) << mantissa_bits
    patterns = data.draw(st.lists(
        st.tuples(st.booleans(), st.integers(1, (1 << mantissa_bits) - 1)), min_size=1,
        max_size=6))
    words = [(sign << (bits - 1)) | exponent_all_ones | mantissa for sign, mantissa in patterns]
    fmt = {2: "H", 4: "I", 8: "Q"}[dtype.itemsize]
    raw = struct.pack(f"<{len(words)}{fmt}", *words)
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).clone()
    assert torch.isnan(tensor).all()
    chunk = data.draw(chunk_sizes, label="chunk_size")
    payload = b"".join(codec.iter_chunks(codec.payload_views({"t": tensor}), chunk))
    assert payload == raw
    decoded = codec.state_dict_from_payload(codec.spec_of({"t": tensor}), payload)
    assert tensor_bytes(decoded["t"]) == raw


@given(st.sampled_from(FLOAT_DTYPES), st.integers(0, 300), st.data())
def test_all_finite_agrees_with_isfinite(dtype: torch.dtype, size: int,
                                         data: st.DataObject) -> None:
    """The fast check (aminmax) against the obvious one, on arbitrary bit
    patterns: every NaN (signalling or quiet, any payload), +-Inf, anywhere."""
    tensor = data.draw(raw_tensors(dtype, (size,)), label="tensor")
    assert codec.all_finite(tensor) == bool(torch.isfinite(tensor).all())


@given(valid_model_specs())
def test_specs_round_trip(specs: codec.ModelSpec) -> None:
    msgs = codec.specs_to_proto(specs)
    assert codec.specs_from_proto(msgs) == specs
    wire = [codec.parse_message(pb.TensorSpec, m.SerializeToString()) for m in msgs]
    assert codec.specs_from_proto(wire) == specs


@given(update_headers())
def test_update_header_round_trip(header: codec.UpdateHeader) -> None:
    msg = codec.update_header_to_proto(header)
    assert codec.update_header_from_proto(msg) == header
    wire = codec.parse_message(pb.UpdateHeader, msg.SerializeToString())
    assert codec.update_header_from_proto(wire) == header
    request = codec.parse_message(
        pb.SendUpdateRequest, pb.SendUpdateRequest(header=msg).SerializeToString())
    assert request.WhichOneof("part") == "header"
    assert codec.update_header_from_proto(request.header) == header


@given(model_headers())
def test_model_header_round_trip(header: codec.ModelHeader) -> None:
    msg = codec.model_header_to_proto(header)
    assert codec.model_header_from_proto(msg) == header
    response = codec.parse_message(
        pb.GetAveragedModelResponse,
        pb.GetAveragedModelResponse(header=msg).SerializeToString())
    assert response.WhichOneof("part") == "header"
    assert codec.model_header_from_proto(response.header) == header


@given(update_headers(), raw_state_dicts(), chunk_sizes)
def test_update_stream_round_trip(header: codec.UpdateHeader, state_dict: StateDict,
                                  chunk_size: int) -> None:
    """update_requests: the header first, then the payload cut into chunks."""
    views = codec.payload_views(state_dict)
    requests = [codec.parse_message(pb.SendUpdateRequest, r.SerializeToString())
                for r in codec.update_requests(header, views, chunk_size)]
    assert requests[0].WhichOneof("part") == "header"
    assert codec.update_header_from_proto(requests[0].header) == header
    assert all(r.WhichOneof("part") == "data" for r in requests[1:])
    assert b"".join(r.data for r in requests[1:]) == payload_of(state_dict)


INVALID = ("num_examples", "sha256", "metrics", "empty_name", "duplicate_name", "unknown_dtype",
           "too_many_dims", "too_large")


@pytest.mark.parametrize("what", INVALID)
@given(header=update_headers(), data=st.data())
def test_invalid_update_headers_are_refused(header: codec.UpdateHeader, what: str,
                                            data: st.DataObject) -> None:
    """Every field update_header_from_proto validates: one broken field makes
    it raise DecodeError (naming the tensor for a bad spec), on the parsed wire
    form too."""
    msg = codec.update_header_to_proto(header)
    tensor: str | None = None
    if what == "num_examples":
        msg.num_examples = data.draw(st.one_of(st.just(0), st.integers(
            codec.MAX_NUM_EXAMPLES + 1, 2**64 - 1)), label="num_examples")
    elif what == "sha256":
        msg.sha256 = data.draw(st.binary(max_size=64).filter(lambda b: len(b) != 32))
    elif what == "metrics":
        msg.metrics[data.draw(st.text(max_size=4), label="key")] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    else:
        spec = pb.TensorSpec(name=data.draw(st.text(min_size=1, max_size=4).filter(
            lambda n: n not in {s.name for s in header.specs}), label="name"),
            dtype=pb.DTYPE_FLOAT32, shape=[2])
        tensor = spec.name
        if what == "empty_name":
            spec.name, tensor = "", None
        elif what == "duplicate_name":
            msg.tensors.append(spec)
        elif what == "unknown_dtype":
            spec.dtype = data.draw(st.integers(-(2**31), 2**31 - 1).filter(
                lambda d: d not in pb.DType.values()), label="dtype")  # type: ignore[assignment]
        elif what == "too_many_dims":
            spec.shape[:] = [1] * data.draw(st.integers(codec.MAX_DIMS + 1, codec.MAX_DIMS + 4))
        else:
            spec.shape[:] = data.draw(st.lists(st.integers(1, 2**64 - 1), min_size=1,
                                               max_size=4).filter(
                lambda dims: numel(dims) * 4 > codec.MAX_TENSOR_BYTES), label="shape")
        msg.tensors.insert(data.draw(st.integers(0, len(msg.tensors)), label="at"), spec)
    for candidate in (msg, codec.parse_message(pb.UpdateHeader, msg.SerializeToString())):
        with pytest.raises(DecodeError) as info:
            codec.update_header_from_proto(candidate)
        if tensor is not None:
            assert info.value.tensor == tensor, repr(info.value)


# -- PayloadChecker --------------------------------------------------------------


@st.composite
def checked_payloads(draw: st.DrawFn) -> tuple[list[Entry], StateDict, bytes]:
    """A finite state_dict (what the checker must accept) and its payload."""
    specs = draw(entries(codec.SUPPORTED_DTYPES, max_tensors=5))
    state_dict = draw(finite_state_dicts(specs))
    return specs, state_dict, payload_of(state_dict)


def feed_pieces(checker: codec.PayloadChecker, payload: bytes,
                pieces: list[tuple[int, int]]) -> None:
    for start, end in pieces:
        checker.feed(payload[start:end])


def feed_and_finish(checker: codec.PayloadChecker, payload: bytes,
                    pieces: list[tuple[int, int]]) -> None:
    feed_pieces(checker, payload, pieces)
    checker.finish()


@given(checked_payloads(), st.data())
def test_checker_accepts_the_right_payload(case: tuple[list[Entry], StateDict, bytes],
                                          data: st.DataObject) -> None:
    _, state_dict, payload = case
    specs = codec.spec_of(state_dict)
    checker = codec.PayloadChecker(specs, hashlib.sha256(payload).digest())
    feed_pieces(checker, payload, data.draw(split_points(len(payload)), label="pieces"))
    assert checker.received == len(payload) == codec.payload_size(specs)
    checker.finish()


@given(checked_payloads(), st.data())
def test_checker_rejects_a_truncated_payload(case: tuple[list[Entry], StateDict, bytes],
                                            data: st.DataObject) -> None:
    _, state_dict, payload = case
    if not payload:
        return
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    checker = codec.PayloadChecker(codec.spec_of(state_dict), hashlib.sha256(payload).digest())
    feed_pieces(checker, payload[:cut], data.draw(split_points(cut), label="pieces"))
    with pytest.raises(MalformedUpdateError, match="truncated"):
        checker.finish()


@given(checked_payloads(), st.binary(min_size=1, max_size=16), st.data())
def test_checker_rejects_extra_bytes(case: tuple[list[Entry], StateDict, bytes], extra: bytes,
                                     data: st.DataObject) -> None:
    _, state_dict, payload = case
    longer = payload + extra
    checker = codec.PayloadChecker(codec.spec_of(state_dict), hashlib.sha256(longer).digest())
    pieces = data.draw(split_points(len(longer)), label="pieces")
    with pytest.raises(MalformedUpdateError, match="longer"):
        feed_pieces(checker, longer, pieces)
    assert checker.received <= len(payload)


@given(checked_payloads(), st.data())
def test_checker_rejects_a_flipped_byte(case: tuple[list[Entry], StateDict, bytes],
                                       data: st.DataObject) -> None:
    _, state_dict, payload = case
    if not payload:
        return
    position = data.draw(st.integers(0, len(payload) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    corrupt = bytearray(payload)
    corrupt[position] ^= mask
    checker = codec.PayloadChecker(codec.spec_of(state_dict), hashlib.sha256(payload).digest())
    pieces = data.draw(split_points(len(payload)), label="pieces")
    # The flip may make a float non-finite (caught by feed) or not (caught by
    # the digest in finish); either way the payload is refused.
    with pytest.raises(MalformedUpdateError):
        feed_and_finish(checker, bytes(corrupt), pieces)


NON_FINITE = (math.nan, -math.nan, math.inf, -math.inf)


@given(checked_payloads(), st.data())
def test_checker_names_the_tensor_with_a_non_finite_value(
        case: tuple[list[Entry], StateDict, bytes], data: st.DataObject) -> None:
    specs, state_dict, _ = case
    floats = [(name, dtype, shape) for name, dtype, shape in specs
              if dtype.is_floating_point and numel(shape) > 0]
    if not floats:
        return
    name, dtype, shape = data.draw(st.sampled_from(floats), label="tensor")
    tensor = state_dict[name].clone()
    index = data.draw(st.integers(0, numel(shape) - 1), label="element")
    if data.draw(st.booleans(), label="signalling NaN bits"):
        word = {2: 0x7C01 if dtype == torch.float16 else 0x7F81, 4: 0x7F800001,
                8: 0x7FF0000000000001}[dtype.itemsize]
        bad = torch.tensor([word], dtype={2: torch.int16, 4: torch.int32,
                                          8: torch.int64}[dtype.itemsize]).view(dtype)
        tensor.view(-1)[index] = bad[0]
        assert torch.isnan(tensor.view(-1)[index])
    else:
        tensor.view(-1)[index] = data.draw(st.sampled_from(NON_FINITE), label="value")
    state_dict = {**state_dict, name: tensor}
    payload = payload_of(state_dict)
    # The digest matches: only the finiteness check can refuse it.
    checker = codec.PayloadChecker(codec.spec_of(state_dict), hashlib.sha256(payload).digest())
    # Cut the payload anywhere, often inside the bad element.
    offset = sum(numel(s) * d.itemsize for n, d, s in specs[:specs.index((name, dtype, shape))])
    element = offset + index * dtype.itemsize
    cuts = data.draw(st.lists(st.one_of(st.integers(element, element + dtype.itemsize),
                                        st.integers(0, len(payload))), max_size=6), label="cuts")
    bounds = [0, *sorted(cuts), len(payload)]
    pieces = list(itertools.pairwise(bounds))
    with pytest.raises(MalformedUpdateError, match="NaN or Inf") as info:
        feed_pieces(checker, payload, pieces)
    assert info.value.tensor == name


# -- decoding hostile bytes ------------------------------------------------------


def decode_payload(specs: codec.ModelSpec, data: st.DataObject) -> None:
    """state_dict_from_payload and tensor_from_bytes with random bytes: of the
    right length where that is small, else of a random length."""
    size = codec.payload_size(specs)
    length = (data.draw(st.sampled_from([size, size + 1, max(0, size - 1)]), label="length")
              if size <= 4096 else data.draw(st.integers(0, 64), label="length"))
    payload = data.draw(st.binary(min_size=length, max_size=length), label="payload")
    try:
        decoded = codec.state_dict_from_payload(specs, payload)
    except ParamServerError:
        pass
    else:
        assert [(n, t.dtype, tuple(t.shape)) for n, t in decoded.items()] == [
            (s.name, s.dtype, s.shape) for s in specs]
        assert b"".join(tensor_bytes(t) for t in decoded.values()) == payload
    for spec in specs:
        length = (spec.nbytes if spec.nbytes <= 4096 and data.draw(st.booleans())
                  else data.draw(st.integers(0, 64)))
        try:
            tensor = codec.tensor_from_bytes(spec, bytes(length))
        except ParamServerError:
            continue
        assert tensor.dtype == spec.dtype
        assert tuple(tensor.shape) == spec.shape


def decode_message(cls: type[pb.SendUpdateRequest] | type[pb.UpdateHeader]
                   | type[pb.GetAveragedModelResponse] | type[pb.ModelHeader],
                   raw: bytes, data: st.DataObject) -> None:
    """What a server or client does with bytes off the wire: parse, decode the
    header, decode a payload for its specs. Our errors only."""
    try:
        msg = codec.parse_message(cls, raw)
        specs: codec.ModelSpec
        if isinstance(msg, pb.SendUpdateRequest):
            if msg.WhichOneof("part") != "header":
                return
            specs = codec.update_header_from_proto(msg.header).specs
        elif isinstance(msg, pb.UpdateHeader):
            specs = codec.update_header_from_proto(msg).specs
        elif isinstance(msg, pb.GetAveragedModelResponse):
            if msg.WhichOneof("part") != "header":
                return
            specs = codec.model_header_from_proto(msg.header).specs
        else:
            specs = codec.model_header_from_proto(msg).specs
    except ParamServerError:
        return
    decode_payload(specs, data)


message_classes = st.sampled_from(
    [pb.SendUpdateRequest, pb.UpdateHeader, pb.GetAveragedModelResponse, pb.ModelHeader])


@given(message_classes, st.binary(max_size=200), st.data())
def test_random_bytes_raise_only_our_errors(
        cls: type[pb.SendUpdateRequest] | type[pb.UpdateHeader]
        | type[pb.GetAveragedModelResponse] | type[pb.ModelHeader],
        raw: bytes, data: st.DataObject) -> None:
    decode_message(cls, raw, data)


@st.composite
def wire_messages(draw: st.DrawFn) -> tuple[type[pb.SendUpdateRequest] | type[pb.UpdateHeader]
                                            | type[pb.GetAveragedModelResponse]
                                            | type[pb.ModelHeader], bytes]:
    """Well-formed messages with hostile field values, serialized, then maybe
    damaged (truncated or with a byte changed)."""
    kind = draw(st.sampled_from(["request", "update", "response", "model"]))
    cls: type[pb.SendUpdateRequest] | type[pb.UpdateHeader] | type[pb.GetAveragedModelResponse] \
        | type[pb.ModelHeader]
    if kind in ("request", "update"):
        header = draw(wire_update_headers())
        cls, raw = ((pb.SendUpdateRequest, pb.SendUpdateRequest(header=header).SerializeToString())
                    if kind == "request" else (pb.UpdateHeader, header.SerializeToString()))
    else:
        model = draw(wire_model_headers())
        cls, raw = ((pb.GetAveragedModelResponse,
                     pb.GetAveragedModelResponse(header=model).SerializeToString())
                    if kind == "response" else (pb.ModelHeader, model.SerializeToString()))
    damage = draw(st.sampled_from(["none", "none", "truncate", "change"]))
    if raw and damage == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif raw and damage == "change":
        position = draw(st.integers(0, len(raw) - 1))
        raw = raw[:position] + bytes([draw(st.integers(0, 255))]) + raw[position + 1:]
    return cls, raw


@given(wire_messages(), st.data())
def test_hostile_messages_raise_only_our_errors(
        case: tuple[type[pb.SendUpdateRequest] | type[pb.UpdateHeader]
                    | type[pb.GetAveragedModelResponse] | type[pb.ModelHeader], bytes],
        data: st.DataObject) -> None:
    cls, raw = case
    decode_message(cls, raw, data)


@example(msgs=[pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT32, shape=[0, 2**64 - 1])])
@example(msgs=[pb.TensorSpec(name="x", dtype=pb.DTYPE_UINT8, shape=[2**40, 2**40, 0])])
@given(st.lists(wire_tensor_specs(), max_size=4))
def test_decoded_specs_raise_only_our_errors(msgs: list[pb.TensorSpec]) -> None:
    """Any spec specs_from_proto accepts can be decoded: a payload of its size
    gives tensors of its specs; anything it refuses, it refuses with DecodeError."""
    try:
        specs = codec.specs_from_proto(msgs)
    except ParamServerError:
        return
    for spec in specs:
        if spec.nbytes <= 4096:
            tensor = codec.tensor_from_bytes(spec, bytes(spec.nbytes))
            assert tensor.dtype == spec.dtype
            assert tuple(tensor.shape) == spec.shape
    if codec.payload_size(specs) <= 4096:
        decoded = codec.state_dict_from_payload(specs, bytes(codec.payload_size(specs)))
        assert list(decoded) == [s.name for s in specs]
