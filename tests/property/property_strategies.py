"""Hypothesis strategies shared by the property tests (imported as a top-level
module: see conftest.py)."""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from paramserver import codec
from paramserver.v1 import parameter_server_pb2 as pb

FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
)
INT_DTYPES: tuple[torch.dtype, ...] = (
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
)
ALL_DTYPES: tuple[torch.dtype, ...] = (*FLOAT_DTYPES, *INT_DTYPES, torch.bool)
NARROW_FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

# A (name, dtype, shape) triple: what a state_dict entry looks like before it
# has values.
Entry = tuple[str, torch.dtype, tuple[int, ...]]
StateDict = dict[str, torch.Tensor]

NAME_CHARS = string.ascii_letters + string.digits + "._-"

# Tensor names: short, from the characters real state_dict keys use.
tensor_names = st.text(alphabet=string.ascii_lowercase + string.digits + "._", min_size=1,
                       max_size=8)
# Valid client names (RoundMachine's rules): 1..64 characters of NAME_CHARS.
client_names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=12)
# Small shapes: 0-d (), empty (a zero dimension) and up to 3 dimensions of <= 3.
small_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
# Text that protobuf can encode (no lone surrogates).
proto_text = st.text(st.characters(codec="utf-8"), max_size=12)

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@st.composite
def entries(draw: st.DrawFn, dtypes: Sequence[torch.dtype] = ALL_DTYPES,
            max_tensors: int = 4, min_tensors: int = 1) -> list[Entry]:
    """Specs of a state_dict: unique names, each with a dtype and a small shape."""
    names = draw(st.lists(tensor_names, min_size=min_tensors, max_size=max_tensors,
                          unique=True))
    return [(name, draw(st.sampled_from(dtypes)), draw(small_shapes)) for name in names]


def float_values(dtype: torch.dtype,
                 max_magnitude: float | None = None) -> st.SearchStrategy[float]:
    """Finite Python floats exactly representable in `dtype` (subnormals, -0.0
    and the largest finite value included unless `max_magnitude` bounds them)."""
    if dtype == torch.bfloat16:
        # bfloat16 is the upper half of a float32: truncating a finite float32's
        # bits gives a finite bfloat16 (truncation never rounds up to inf).
        base = st.floats(width=32, allow_nan=False, allow_infinity=False).map(_truncate_to_bf16)
    else:
        width = {torch.float16: 16, torch.float32: 32, torch.float64: 64}[dtype]
        base = st.floats(width=width, allow_nan=False, allow_infinity=False)  # type: ignore[arg-type]
    if max_magnitude is not None:
        bound = max_magnitude
        base = base.filter(lambda v: abs(v) <= bound)
    return base


def _truncate_to_bf16(value: float) -> float:
    bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())
    bits &= ~0xFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def int_values(dtype: torch.dtype, max_magnitude: int | None = None) -> st.SearchStrategy[int]:
    info = torch.iinfo(dtype)
    lo, hi = info.min, info.max
    if max_magnitude is not None:
        lo, hi = max(lo, -max_magnitude), min(hi, max_magnitude)
    return st.integers(lo, hi)


def element_values(dtype: torch.dtype, *, float_max: float | None = None,
                   int_max: int | None = None) -> st.SearchStrategy[float | int | bool]:
    if dtype == torch.bool:
        return st.booleans()
    if dtype.is_floating_point:
        return float_values(dtype, float_max)
    return int_values(dtype, int_max)


@st.composite
def finite_tensors(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, ...], *,
                   float_max: float | None = None, int_max: int | None = None) -> torch.Tensor:
    """A tensor of `dtype` and `shape` with finite values."""
    n = numel(shape)
    values = draw(st.lists(element_values(dtype, float_max=float_max, int_max=int_max),
                           min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def finite_state_dicts(draw: st.DrawFn, specs: Sequence[Entry], *, float_max: float | None = None,
                       int_max: int | None = None) -> StateDict:
    return {name: draw(finite_tensors(dtype, shape, float_max=float_max, int_max=int_max))
            for name, dtype, shape in specs}


def tensor_from_raw(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """A tensor owning a copy of the raw little-endian bytes `raw`."""
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()


@st.composite
def raw_tensors(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor with arbitrary bit patterns (NaN payloads, signalling NaNs, inf,
    -0.0, subnormals for floats); bools stay 0 or 1."""
    nbytes = numel(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    return tensor_from_raw(dtype, shape, raw)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes in row-major order (bit-exact comparison)."""
    return bytes(codec.tensor_view(tensor))


# -- protobuf messages ---------------------------------------------------------

# Hostile but well-formed messages. Each field is mostly valid, so that many
# messages get past the first check and the later ones are exercised too.
known_wire_dtypes = st.sampled_from([int(v) for v in pb.DType.values()])
# Dimensions: mostly small, sometimes zero or as large as uint64 allows.
wire_dims = st.one_of(st.integers(0, 4), st.just(0), st.integers(0, UINT64_MAX),
                      st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, UINT64_MAX]))
wire_digests = st.binary(min_size=32, max_size=32)
finite_metrics = st.dictionaries(proto_text, st.floats(allow_nan=False, allow_infinity=False),
                                 max_size=3)
# Which field of a header to break, if any (at most one, so that the checks
# after the first one are reached too).
HEADER_FIELDS = ("num_examples", "sha256", "metrics", "name", "duplicate", "dtype", "dims")
header_breakage = st.one_of(st.none(), st.none(), st.sampled_from(HEADER_FIELDS))


@st.composite
def wire_tensor_specs(draw: st.DrawFn, broken: str | None = None) -> pb.TensorSpec:
    """A TensorSpec message: a known dtype and a non-empty name unless `broken`
    says otherwise; dimensions anything uint64 holds."""
    name = "" if broken == "name" else draw(proto_text.filter(bool))
    dtype = (draw(st.integers(-(2**31), 2**31 - 1)) if broken == "dtype"
             else draw(known_wire_dtypes))
    max_dims = codec.MAX_DIMS + 4 if broken == "dims" else 4
    return pb.TensorSpec(name=name, dtype=dtype,  # type: ignore[arg-type]
                         shape=draw(st.lists(wire_dims, max_size=max_dims)))


@st.composite
def wire_spec_lists(draw: st.DrawFn, broken: str | None) -> list[pb.TensorSpec]:
    specs = [draw(wire_tensor_specs()) for _ in range(draw(st.integers(0, 4)))]
    if broken in ("name", "dtype", "dims"):
        specs.insert(draw(st.integers(0, len(specs))), draw(wire_tensor_specs(broken)))
    elif broken == "duplicate" and specs:
        specs.append(specs[draw(st.integers(0, len(specs) - 1))])
    return specs


@st.composite
def broken_digests(draw: st.DrawFn, broken: str | None) -> bytes:
    if broken == "sha256":
        return draw(st.binary(max_size=40).filter(lambda b: len(b) != 32))
    return draw(wire_digests)


@st.composite
def broken_metrics(draw: st.DrawFn, broken: str | None) -> dict[str, float]:
    if broken == "metrics":
        return draw(st.dictionaries(proto_text, st.sampled_from([math.nan, math.inf, -math.inf]),
                                    min_size=1, max_size=3))
    return draw(finite_metrics)


@st.composite
def wire_update_headers(draw: st.DrawFn) -> pb.UpdateHeader:
    """An UpdateHeader message, valid or with one field broken."""
    broken = draw(header_breakage)
    return pb.UpdateHeader(
        client_id=draw(proto_text), round=draw(st.integers(0, UINT64_MAX)),
        num_examples=(draw(st.sampled_from([0, codec.MAX_NUM_EXAMPLES + 1, UINT64_MAX]))
                      if broken == "num_examples"
                      else draw(st.integers(1, codec.MAX_NUM_EXAMPLES))),
        tensors=draw(wire_spec_lists(broken)), sha256=draw(broken_digests(broken)),
        metrics=draw(broken_metrics(broken)),
    )


@st.composite
def wire_model_headers(draw: st.DrawFn) -> pb.ModelHeader:
    """A ModelHeader message, valid or with one field broken."""
    broken = draw(header_breakage)
    return pb.ModelHeader(
        round=draw(st.integers(0, UINT64_MAX)), tensors=draw(wire_spec_lists(broken)),
        sha256=draw(broken_digests(broken)), num_updates=draw(st.integers(0, UINT32_MAX)),
        total_examples=draw(st.integers(0, UINT64_MAX)), metrics=draw(broken_metrics(broken)),
    )


# -- valid specs and headers ----------------------------------------------------

@st.composite
def valid_shapes(draw: st.DrawFn, dtype: torch.dtype) -> tuple[int, ...]:
    """Shapes any validator must accept: 0-d, empty, up to MAX_DIMS dimensions,
    sometimes one large dimension, never more than MAX_TENSOR_BYTES (and no huge
    dimension beside a zero: the hostile strategies above try those)."""
    dims = draw(st.one_of(st.lists(st.integers(0, 6), max_size=5),
                          st.lists(st.integers(1, 2), max_size=codec.MAX_DIMS - 1)))
    if draw(st.booleans()):
        nonzero = numel([d for d in dims if d])
        room = codec.MAX_TENSOR_BYTES // (dtype.itemsize * nonzero)
        dims.insert(draw(st.integers(0, len(dims))), draw(st.integers(1, room)))
    return tuple(dims)


@st.composite
def valid_tensor_specs(draw: st.DrawFn, name: str) -> codec.TensorSpec:
    dtype = draw(st.sampled_from(codec.SUPPORTED_DTYPES))
    return codec.TensorSpec(name, dtype, draw(valid_shapes(dtype)))


@st.composite
def valid_model_specs(draw: st.DrawFn, max_tensors: int = 4) -> codec.ModelSpec:
    names = draw(st.lists(proto_text.filter(bool), max_size=max_tensors, unique=True))
    return tuple(draw(valid_tensor_specs(name)) for name in names)


@st.composite
def update_headers(draw: st.DrawFn) -> codec.UpdateHeader:
    return codec.UpdateHeader(
        client_id=draw(proto_text), round=draw(st.integers(0, UINT64_MAX)),
        num_examples=draw(st.integers(1, codec.MAX_NUM_EXAMPLES)), specs=draw(valid_model_specs()),
        sha256=draw(st.binary(min_size=32, max_size=32)), metrics=draw(finite_metrics),
    )


@st.composite
def model_headers(draw: st.DrawFn) -> codec.ModelHeader:
    return codec.ModelHeader(
        round=draw(st.integers(0, UINT64_MAX)), specs=draw(valid_model_specs()),
        sha256=draw(st.binary(min_size=32, max_size=32)),
        num_updates=draw(st.integers(0, UINT32_MAX)),
        total_examples=draw(st.integers(0, UINT64_MAX)), metrics=draw(finite_metrics),
    )


@st.composite
def split_points(draw: st.DrawFn, total: int) -> list[tuple[int, int]]:
    """Cuts range(total) into consecutive (start, end) pieces at random points,
    empty pieces included."""
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=8)))
    bounds = [0, *cuts, total]
    return list(itertools.pairwise(bounds))
