"""Tensors and state_dicts <-> protobuf messages and byte chunks.

Owns the wire format: the dtype enum, specs and headers as messages, cutting a
payload (laid out by specs.py) into chunks and checking a received stream of
chunks as it arrives. Nothing is ever pickled. Symmetric `*_to_proto` /
`*_from_proto` pairs; every `_from_proto` validates and raises DecodeError (or
MalformedUpdateError) and nothing else.

Imports torch and the generated messages; must not import grpc or do any I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.protobuf.message import Message

from paramserver.errors import DecodeError, MalformedUpdateError, listing, quote
from paramserver.specs import (  # re-exported: the wire's view of the same things
    SUPPORTED_DTYPES,
    Buffer,
    ModelSpec,
    TensorSpec,
    all_finite,
    check_specs_match,
    payload_digest,
    payload_size,
    payload_views,
    shape_text,
    spec_of,
    state_dict_digest,
    state_dict_from_payload,
    tensor_from_bytes,
    tensor_view,
)
from paramserver.v1 import parameter_server_pb2 as pb

__all__ = ["SUPPORTED_DTYPES", "Buffer", "ModelSpec", "TensorSpec", "all_finite",
           "check_specs_match", "payload_digest", "payload_size", "payload_views",
           "spec_of", "state_dict_digest", "state_dict_from_payload", "tensor_from_bytes",
           "tensor_view"]

# 512 KiB: large enough that per-message overhead is small (a 100 MB round at
# N=4 took 2.3 s with 256 KiB chunks, 1.9 s with 512 KiB), small enough that
# the chunks in flight keep server memory flat in the number of clients (peak
# RSS at N=64 over N=4, 100 MB model: 1.19x; 1.29x with 1 MiB chunks).
DEFAULT_CHUNK_SIZE = 512 << 10
MAX_CHUNK_SIZE = 3 << 20  # stays under gRPC's default 4 MiB message limit
MAX_TENSOR_BYTES = 1 << 40
MAX_DIMS = 32
# Bounds each weight so that any round's total fits the wire's uint64 and every
# weight is exact in a float64.
MAX_NUM_EXAMPLES = 1 << 40

# dtype <-> wire enum. Which dtypes are averaged as floats lives in averaging.py.
_DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.int16: pb.DTYPE_INT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.bool: pb.DTYPE_BOOL,
}
_DTYPES_FROM_WIRE = {wire: dtype for dtype, wire in _DTYPES.items()}
assert set(_DTYPES) == set(SUPPORTED_DTYPES)


@dataclass(frozen=True)
class UpdateHeader:
    client_id: str
    round: int
    num_examples: int
    specs: ModelSpec
    sha256: bytes
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelHeader:
    round: int
    specs: ModelSpec
    sha256: bytes
    num_updates: int = 0
    total_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


# -- specs -------------------------------------------------------------------


def tensor_spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=_DTYPES[spec.dtype], shape=spec.shape)  # type: ignore[arg-type]


def tensor_spec_from_proto(msg: pb.TensorSpec) -> TensorSpec:
    """Raises DecodeError naming the tensor for an invalid spec."""
    if not msg.name:
        raise DecodeError("tensor spec with an empty name")
    if msg.dtype not in _DTYPES_FROM_WIRE:
        raise DecodeError(f"unknown dtype {msg.dtype}", tensor=msg.name)
    if len(msg.shape) > MAX_DIMS:
        raise DecodeError(f"{len(msg.shape)} dimensions, at most {MAX_DIMS}", tensor=msg.name)
    spec = TensorSpec(msg.name, _DTYPES_FROM_WIRE[msg.dtype], tuple(msg.shape))
    # Zero dims make an empty tensor whatever the others are, but torch still
    # computes strides from them: bound the product of the non-zero dims too.
    extent = math.prod(d for d in spec.shape if d) * spec.dtype.itemsize
    if extent > MAX_TENSOR_BYTES:
        raise DecodeError(f"shape {shape_text(spec.shape)} is too large", tensor=msg.name)
    return spec


def specs_to_proto(specs: ModelSpec) -> list[pb.TensorSpec]:
    return [tensor_spec_to_proto(s) for s in specs]


def specs_from_proto(msgs: Iterable[pb.TensorSpec]) -> ModelSpec:
    """Raises DecodeError for an invalid spec or a repeated name."""
    specs = tuple(tensor_spec_from_proto(m) for m in msgs)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise DecodeError("name appears twice", tensor=spec.name)
        seen.add(spec.name)
    return specs


def check_spec_count(msgs: Sequence[pb.TensorSpec], expected: ModelSpec) -> None:
    """Raises MalformedUpdateError if there are not as many specs as `expected`
    has tensors: checked before a peer's specs are decoded, so that 100,000 of
    them cost next to nothing. A few too many or too few are named."""
    if len(msgs) == len(expected):
        return
    detail = ""
    if len(msgs) <= 2 * len(expected) + 16:  # cheap enough to say which
        got, want = {m.name for m in msgs}, {s.name for s in expected}
        missing, extra = listing(sorted(want - got)), listing(sorted(got - want))
        detail = f": missing {missing}, unexpected {extra}"
    raise MalformedUpdateError(f"{len(msgs)} tensor specs, the model has {len(expected)}{detail}")


# -- headers -----------------------------------------------------------------


def update_header_to_proto(header: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        client_id=header.client_id, round=header.round, num_examples=header.num_examples,
        tensors=specs_to_proto(header.specs), sha256=header.sha256, metrics=dict(header.metrics),
    )


def update_header_from_proto(msg: pb.UpdateHeader,
                             expected: ModelSpec | None = None) -> UpdateHeader:
    """Raises DecodeError for an invalid header; with `expected`, first
    MalformedUpdateError if the number of specs differs from the model's."""
    if expected is not None:
        check_spec_count(msg.tensors, expected)
    _check_num_examples(msg.num_examples)
    return UpdateHeader(
        client_id=msg.client_id, round=msg.round, num_examples=msg.num_examples,
        specs=specs_from_proto(msg.tensors), sha256=_digest_from_proto(msg.sha256),
        metrics=_metrics_from_proto(msg.metrics),
    )


def model_header_to_proto(header: ModelHeader) -> pb.ModelHeader:
    return pb.ModelHeader(
        round=header.round, tensors=specs_to_proto(header.specs), sha256=header.sha256,
        num_updates=header.num_updates, total_examples=header.total_examples,
        metrics=dict(header.metrics),
    )


def model_header_from_proto(msg: pb.ModelHeader) -> ModelHeader:
    """Raises DecodeError for an invalid header."""
    return ModelHeader(
        round=msg.round, specs=specs_from_proto(msg.tensors),
        sha256=_digest_from_proto(msg.sha256), num_updates=msg.num_updates,
        total_examples=msg.total_examples, metrics=_metrics_from_proto(msg.metrics),
    )


_ROLES = {"train": pb.RoundAssignment.TRAIN, "wait": pb.RoundAssignment.WAIT,
          "finished": pb.RoundAssignment.FINISHED}
_ROLES_FROM_WIRE = {wire: role for role, wire in _ROLES.items()}


@dataclass(frozen=True)
class Plan:
    """A RoundAssignment: role is "train", "wait" or "finished"."""

    role: str
    round: int
    model_round: int
    config: Mapping[str, float] = field(default_factory=dict)
    evaluate_round: int = 0


def plan_to_proto(plan: Plan) -> pb.RoundAssignment:
    return pb.RoundAssignment(role=_ROLES[plan.role], round=plan.round,
                              model_round=plan.model_round, config=dict(plan.config),
                              evaluate_round=plan.evaluate_round)


def plan_from_proto(msg: pb.RoundAssignment) -> Plan:
    """Raises DecodeError for an unknown role or a non-finite setting."""
    if msg.role not in _ROLES_FROM_WIRE:
        raise DecodeError(f"unknown round assignment role {msg.role}")
    return Plan(_ROLES_FROM_WIRE[msg.role], msg.round, msg.model_round,
                _metrics_from_proto(msg.config), msg.evaluate_round)


@dataclass(frozen=True)
class EvaluationReport:
    client_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def evaluation_report_to_proto(report: EvaluationReport) -> pb.EvaluationReport:
    return pb.EvaluationReport(client_id=report.client_id, round=report.round,
                               num_examples=report.num_examples, metrics=dict(report.metrics))


def _check_num_examples(num_examples: int) -> None:
    if not 1 <= num_examples <= MAX_NUM_EXAMPLES:
        raise DecodeError(f"num_examples must be in 1..{MAX_NUM_EXAMPLES}, got {num_examples}")


def evaluation_report_from_proto(msg: pb.EvaluationReport) -> EvaluationReport:
    """Raises DecodeError for num_examples outside 1..2^40 or a non-finite metric."""
    _check_num_examples(msg.num_examples)
    return EvaluationReport(msg.client_id, msg.round, msg.num_examples,
                            _metrics_from_proto(msg.metrics))


def _digest_from_proto(digest: bytes) -> bytes:
    if len(digest) != hashlib.sha256().digest_size:
        raise DecodeError(f"sha256 must be 32 bytes, got {len(digest)}")
    return bytes(digest)


def _metrics_from_proto(metrics: Mapping[str, float]) -> dict[str, float]:
    for key, value in metrics.items():
        if not math.isfinite(value):
            raise DecodeError(f"metric {quote(key)} is not finite: {value}")
    return dict(metrics)


# -- payloads ----------------------------------------------------------------


def iter_chunks(views: Iterable[Buffer], chunk_size: int) -> Iterator[bytes]:
    """Cuts the concatenation of `views` into chunks of exactly `chunk_size`
    bytes (the last may be shorter); small tensors share a chunk."""
    return (b"".join(pieces) for pieces in chunk_pieces(views, chunk_size))


def chunk_pieces(views: Iterable[Buffer], chunk_size: int) -> Iterator[list[memoryview]]:
    """The chunks of `iter_chunks`, each as the views that make it up, uncopied."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    pending: list[memoryview] = []
    filled = 0
    for view in views:
        mv = memoryview(view)
        while len(mv):
            take = min(len(mv), chunk_size - filled)
            pending.append(mv[:take])
            filled += take
            mv = mv[take:]
            if filled == chunk_size:
                yield pending
                pending, filled = [], 0
    if filled:
        yield pending


def update_requests(header: UpdateHeader, views: Sequence[Buffer],
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pb.SendUpdateRequest]:
    """The SendUpdate stream as protobuf messages: header, then data chunks.
    What a client written from the .proto sends; ours sends `wire.stream`."""
    yield pb.SendUpdateRequest(header=update_header_to_proto(header))
    for chunk in iter_chunks(views, chunk_size):
        yield pb.SendUpdateRequest(data=chunk)


M = TypeVar("M", bound=Message)


def parse_message(cls: type[M], data: bytes) -> M:
    """Parses serialized protobuf bytes; raises DecodeError, never protobuf's."""
    try:
        return cls.FromString(data)
    except (_ProtobufDecodeError, RuntimeWarning, ValueError) as exc:
        raise DecodeError(f"cannot parse {cls.__name__}: {exc}") from None


# -- checking a stream as it arrives -----------------------------------------


class PayloadChecker:
    """Checks payload bytes as they stream in, in O(chunk) memory: never more
    bytes than the specs declare, every float finite and every bool 0 or 1
    (naming the tensor), and
    the SHA-256 at the end. Each piece is passed on to the caller's sink only
    after it has been checked; no I/O of its own.
    """

    def __init__(self, specs: ModelSpec, sha256: bytes) -> None:
        self._specs = specs
        self._expected = sha256
        self._total = payload_size(specs)
        self._hash = hashlib.sha256()
        self._received = 0
        self._index = 0  # tensor that byte `_received` belongs to
        self._tensor_end = specs[0].nbytes if specs else 0
        self._carry = b""  # bytes of a float element split between chunks

    @property
    def received(self) -> int:
        return self._received

    def feed(self, data: Buffer) -> None:
        """Raises MalformedUpdateError for too many bytes or a non-finite value."""
        if self._received + len(data) > self._total:
            raise MalformedUpdateError(
                f"payload longer than the {self._total} bytes its specs declare")
        self._hash.update(data)
        view = memoryview(data)
        while len(view):
            self._skip_empty_tensors()
            take = min(len(view), self._tensor_end - self._received)
            assert take > 0, "the length check above keeps every byte inside a tensor"
            self._check_values(view[:take])
            self._received += take
            view = view[take:]

    def finish(self) -> None:
        """Raises MalformedUpdateError if bytes are missing or the digest differs."""
        if self._received != self._total:
            raise MalformedUpdateError(
                f"truncated payload: {self._received} of {self._total} bytes"
                + (f", stopped inside tensor {quote(self._specs[self._index].name)}"
                   if self._index < len(self._specs) else ""))
        if self._hash.digest() != self._expected:
            raise MalformedUpdateError("payload sha256 does not match the header")

    def _skip_empty_tensors(self) -> None:
        while self._received == self._tensor_end and self._index + 1 < len(self._specs):
            self._index += 1
            self._tensor_end += self._specs[self._index].nbytes

    def _check_values(self, piece: memoryview) -> None:
        spec = self._specs[self._index]
        if spec.dtype == torch.bool:
            if torch.frombuffer(piece, dtype=torch.uint8).gt(1).any():
                raise MalformedUpdateError("bool bytes must be 0 or 1", tensor=spec.name)
            return
        if not spec.dtype.is_floating_point:
            return
        data = self._carry + bytes(piece) if self._carry else piece
        usable = len(data) - len(data) % spec.dtype.itemsize
        self._carry = bytes(data[usable:])
        if usable and not all_finite(torch.frombuffer(data[:usable], dtype=spec.dtype)):
            raise MalformedUpdateError("contains NaN or Inf", tensor=spec.name)


