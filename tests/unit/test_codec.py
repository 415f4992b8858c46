import hashlib

import pytest
import torch

from paramserver import codec
from paramserver.errors import DecodeError, MalformedUpdateError
from paramserver.v1 import parameter_server_pb2 as pb


def sample() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.empty(0, 2, dtype=torch.float16),
        "bf": torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
        "num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }


def test_payload_round_trip_is_bit_exact() -> None:
    sd = sample()
    specs = codec.spec_of(sd)
    payload = b"".join(codec.iter_chunks(codec.payload_views(sd), 5))
    assert len(payload) == codec.payload_size(specs)
    back = codec.state_dict_from_payload(specs, payload)
    for name, tensor in sd.items():
        assert back[name].dtype == tensor.dtype
        assert back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)


def test_borrowed_tensors_share_the_payload_where_aligned() -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32), "odd": torch.ones(3, dtype=torch.float16),
          "d": torch.tensor([2.5], dtype=torch.float64)}
    specs = codec.spec_of(sd)
    payload = bytearray(b"".join(codec.payload_views(sd)))
    back = codec.state_dict_from_payload(specs, payload, borrow=True)
    assert back["w"].data_ptr() == torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    # "d" starts at byte 30: not 8-aligned, so it is a copy, with the same value.
    assert torch.equal(back["d"], sd["d"])
    assert torch.equal(back["odd"], sd["odd"])
    back["w"].add_(1)  # writable, and writes land in the payload it borrows
    assert payload[:4] == bytes(codec.tensor_view(torch.tensor([1.0])))
    with pytest.raises(BufferError):  # pinned: it cannot move under the tensors
        payload.extend(b"more")


def test_chunks_have_exact_size_and_cover_payload() -> None:
    views = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh")]
    assert list(codec.iter_chunks(views, 3)) == [b"abc", b"def", b"gh"]
    with pytest.raises(ValueError, match="chunk_size"):
        list(codec.iter_chunks(views, codec.MAX_CHUNK_SIZE + 1))


def test_non_contiguous_tensor_is_sent_in_row_major_order() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    assert bytes(codec.tensor_view(t)) == bytes(codec.tensor_view(t.contiguous()))


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(MalformedUpdateError, match="'z'"):
        codec.spec_of({"z": torch.zeros(2, dtype=torch.complex64)})


def test_spec_and_header_round_trip() -> None:
    specs = codec.spec_of(sample())
    assert codec.specs_from_proto(codec.specs_to_proto(specs)) == specs
    header = codec.UpdateHeader("c1", 3, 10, specs, hashlib.sha256(b"x").digest(), {"loss": 0.5})
    assert codec.update_header_from_proto(codec.update_header_to_proto(header)) == header
    model = codec.ModelHeader(2, specs, hashlib.sha256(b"y").digest(), 3, 30, {"acc": 0.9})
    assert codec.model_header_from_proto(codec.model_header_to_proto(model)) == model


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (pb.TensorSpec(name="", dtype=pb.DTYPE_FLOAT32), "empty name"),
        (pb.TensorSpec(name="t", dtype=pb.DTYPE_UNSPECIFIED), "unknown dtype"),
        (pb.TensorSpec(name="t", dtype=pb.DTYPE_FLOAT32, shape=[1 << 40, 1 << 20]), "too large"),
        (pb.TensorSpec(name="t", dtype=pb.DTYPE_FLOAT32, shape=[1] * 33), "dimensions"),
    ],
)
def test_invalid_specs_raise_decode_error(msg: pb.TensorSpec, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        codec.tensor_spec_from_proto(msg)


def test_repeated_name_and_bad_header_fields() -> None:
    spec = pb.TensorSpec(name="t", dtype=pb.DTYPE_FLOAT32)
    with pytest.raises(DecodeError, match="twice"):
        codec.specs_from_proto([spec, spec])
    with pytest.raises(DecodeError, match="num_examples"):
        codec.update_header_from_proto(pb.UpdateHeader(num_examples=0, sha256=b"0" * 32))
    with pytest.raises(DecodeError, match="32 bytes"):
        codec.update_header_from_proto(pb.UpdateHeader(num_examples=1, sha256=b"short"))
    with pytest.raises(DecodeError, match="metric"):
        codec.update_header_from_proto(pb.UpdateHeader(
            num_examples=1, sha256=b"0" * 32, metrics={"loss": float("nan")}))


def test_check_specs_match_names_the_tensor() -> None:
    specs = codec.spec_of(sample())
    wrong_shape = codec.spec_of({**sample(), "w": torch.zeros(4, 3)})
    with pytest.raises(MalformedUpdateError, match=r"'w'.*shape"):
        codec.check_specs_match(wrong_shape, specs)
    wrong_dtype = codec.spec_of({**sample(), "w": torch.zeros(3, 4, dtype=torch.float64)})
    with pytest.raises(MalformedUpdateError, match=r"'w'.*dtype"):
        codec.check_specs_match(wrong_dtype, specs)
    with pytest.raises(MalformedUpdateError, match=r"missing \['mask'\]"):
        codec.check_specs_match(specs[:-1], specs)
    with pytest.raises(MalformedUpdateError, match="out of order"):
        codec.check_specs_match(tuple(reversed(specs)), specs)


def checker_for(sd: dict[str, torch.Tensor]) -> tuple[codec.PayloadChecker, bytes]:
    views = codec.payload_views(sd)
    return codec.PayloadChecker(codec.spec_of(sd), codec.payload_digest(views)), b"".join(views)


def test_payload_checker_accepts_good_stream_in_any_chunking() -> None:
    for size in (1, 3, 7, 1000):
        checker, payload = checker_for(sample())
        for chunk in codec.iter_chunks([payload], size):
            checker.feed(chunk)
        checker.finish()
        assert checker.received == len(payload)


def test_payload_checker_rejects_nan_split_across_chunks() -> None:
    sd = {"a": torch.zeros(3), "b": torch.tensor([0.0, float("nan")])}
    specs = codec.spec_of(sd)
    payload = b"".join(codec.payload_views(sd))
    checker = codec.PayloadChecker(specs, hashlib.sha256(payload).digest())
    chunks = list(codec.iter_chunks([payload], 3))
    for chunk in chunks[:-1]:  # the NaN's last byte is in the last chunk
        checker.feed(chunk)
    with pytest.raises(MalformedUpdateError, match=r"'b'.*NaN"):
        checker.feed(chunks[-1])


def test_payload_checker_rejects_long_short_and_corrupt_payloads() -> None:
    checker, payload = checker_for(sample())
    with pytest.raises(MalformedUpdateError, match="longer"):
        checker.feed(payload + b"x")
    checker, payload = checker_for(sample())
    checker.feed(payload[:-1])
    with pytest.raises(MalformedUpdateError, match="truncated"):
        checker.finish()
    checker, payload = checker_for(sample())
    checker.feed(payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(MalformedUpdateError, match="sha256"):
        checker.finish()


def test_parse_message_wraps_protobuf_errors() -> None:
    with pytest.raises(DecodeError, match="SendUpdateRequest"):
        codec.parse_message(pb.SendUpdateRequest, b"\xff\xff\xff")


def test_tensor_from_bytes_checks_length() -> None:
    spec = codec.TensorSpec("t", torch.float32, (2,))
    with pytest.raises(DecodeError, match="'t'"):
        codec.tensor_from_bytes(spec, b"\x00" * 7)


def test_payload_checker_rejects_bool_bytes_other_than_0_and_1() -> None:
    specs = (codec.TensorSpec("mask", torch.bool, (3,)),)
    payload = bytes([1, 0, 2])
    checker = codec.PayloadChecker(specs, hashlib.sha256(payload).digest())
    with pytest.raises(MalformedUpdateError, match=r"'mask'.*0 or 1"):
        checker.feed(payload)
