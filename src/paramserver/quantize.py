"""Fixed-point quantisation of weighted updates for secure aggregation, and
decoding of the unmasked sum back into a weighted mean.

A client with weight w (its number of examples) sends the vector
    [w * q(x_1), ..., w * q(x_L), w]   mod 2**bits,
q(x) = round_half_even(clip(x, -clip, clip) * 2**frac_bits), every tensor
flattened in the agreed order of names. The sum over clients holds
S_j = sum_i w_i * q(x_ij) (two's complement in `bits` bits) and W = sum_i w_i;
dequantize returns S_j / (W * 2**frac_bits).

Guarantees, with m_j the weighted mean of the clipped inputs:
- no wrap-around: each client checks w * ceil(clip * 2**frac_bits) *
  max_clients < 2**(bits-1) (and w * max_clients < 2**(bits-1)), so |S_j| and
  W stay below 2**(bits-1) for up to max_clients clients;
- |S_j / (W * 2**frac_bits) - m_j| <= 2**-(frac_bits+1) exactly (each q is
  within 1/2 of x * 2**frac_bits; the error is a weighted mean of those);
- the float64 result is float64(S_j) / (float64(W) * 2**frac_bits): scaling
  by a power of two is exact and the division is correctly rounded, so it is
  the exact quotient correctly rounded when |S_j| <= 2**53 and W <= 2**53, and
  within a relative (1 + 2**-53)**3 - 1 (about 3 * 2**-53) of it otherwise;
- then one cast to each tensor's dtype (float16 and bfloat16 go through
  float32 in torch, so they are rounded twice); integer tensors are rounded
  half to even first and clamped to the dtype's range; bool is True iff the
  rounded mean is non-zero, i.e. the weight of True is more than half (a tie
  is False, as in averaging.py). Integer and bool inputs are quantised as
  their float64 values (int64 beyond 2**53 loses its low bits).

Imports torch, numpy, paramserver.errors and paramserver.specs; the only
module of secure aggregation that loads torch. No grpc, threads or I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import torch

from paramserver.errors import SecAggError, listing, quote
from paramserver.specs import SUPPORTED_DTYPES, TensorSpec

Vector = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Quantization:
    """The fixed-point format: values mod 2**bits with frac_bits fractional
    bits, inputs clipped to [-clip, clip]. Raises SecAggError when invalid."""

    bits: int = 64
    frac_bits: int = 24
    clip: float = 4096.0

    def __post_init__(self) -> None:
        if type(self.bits) is not int or not 1 <= self.bits <= 64:
            raise SecAggError(f"bits must be an integer in 1..64, got {quote(self.bits)}")
        if type(self.frac_bits) is not int or not 0 <= self.frac_bits < self.bits:
            raise SecAggError(f"frac_bits must be an integer in 0..{self.bits - 1}, "
                              f"got {quote(self.frac_bits)}")
        if (not isinstance(self.clip, float | int) or isinstance(self.clip, bool)
                or not math.isfinite(self.clip) or self.clip <= 0):
            raise SecAggError(f"clip must be a finite number above 0, got {quote(self.clip)}")

    @property
    def max_magnitude(self) -> int:
        """An upper bound on |q(x)|: ceil(clip * 2**frac_bits), exactly."""
        return math.ceil(Fraction(self.clip) * (1 << self.frac_bits))


def check_headroom(weight: int, max_clients: int, q: Quantization) -> None:
    """Raises SecAggError unless the sum of up to `max_clients` updates of at
    most this weight cannot wrap around 2**(bits-1)."""
    if type(weight) is not int or weight < 0:
        raise SecAggError(f"the weight must be a non-negative integer, got {quote(weight)}")
    if type(max_clients) is not int or max_clients < 1:
        raise SecAggError(f"max_clients must be a positive integer, got {quote(max_clients)}")
    if weight * max_clients * max(q.max_magnitude, 1) >= 1 << (q.bits - 1):
        raise SecAggError(
            f"no headroom: weight {weight} x clip {q.clip} x 2**{q.frac_bits} x {max_clients} "
            f"clients reaches 2**{q.bits - 1}, so the sum could wrap around; lower clip, "
            f"frac_bits or the weight, or raise bits")


def quantize(state_dict: Mapping[str, torch.Tensor], names: Sequence[str], weight: int,
             q: Quantization, max_clients: int) -> Vector:
    """The vector this client masks: its tensors in `names` order, fixed
    point and multiplied by `weight`, then the weight (see the module
    docstring). Raises SecAggError (before reading a value) if there is no
    headroom for `max_clients` clients, if the names are not exactly the
    state_dict's keys, or naming a tensor with NaN or Inf."""
    check_headroom(weight, max_clients, q)
    _check_names(state_dict, names)
    values = np.concatenate([_as_float64(name, state_dict[name]) for name in names]
                            + [np.zeros(0, dtype=np.float64)])
    np.clip(values, -q.clip, q.clip, out=values)
    # x * 2**frac_bits is exact; rint rounds half to even; |result| <=
    # max_magnitude < 2**63 by the headroom check, so int64 holds it exactly.
    fixed = np.rint(np.ldexp(values, q.frac_bits)).astype(np.int64)
    fixed *= np.int64(weight)
    out = np.append(fixed.view(np.uint64), np.uint64(weight))
    if q.bits < 64:
        np.bitwise_and(out, np.uint64((1 << q.bits) - 1), out=out)
    return out


def _check_names(state_dict: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    if len(set(names)) != len(names):
        raise SecAggError("the names of the tensors to quantise are not distinct")
    missing = [n for n in names if n not in state_dict]
    extra = [n for n in state_dict if n not in set(names)]
    if missing or extra:
        raise SecAggError(f"tensor names differ: missing {listing(missing)}, "
                          f"unexpected {listing(extra)}")


def _as_float64(name: str, tensor: torch.Tensor) -> npt.NDArray[np.float64]:
    if not isinstance(tensor, torch.Tensor):
        raise SecAggError(f"tensor {quote(name)}: not a tensor but {type(tensor).__name__}")
    values = tensor.detach().cpu().reshape(-1).to(torch.float64).numpy()
    if not np.isfinite(values).all():
        raise SecAggError(f"tensor {quote(name)}: contains NaN or Inf")
    return values


def dequantize(total: Vector, specs: Sequence[TensorSpec],
               q: Quantization) -> dict[str, torch.Tensor]:
    """The weighted mean the unmasked sum `total` stands for, as tensors of
    the specs' dtypes and shapes (see the module docstring for the rounding).
    Raises SecAggError for a vector of the wrong length or type, values not
    below 2**bits, or a total weight that is zero or wrapped around."""
    for spec in specs:
        if not isinstance(spec, TensorSpec) or spec.dtype not in SUPPORTED_DTYPES:
            raise SecAggError(f"spec {quote(spec)} is not a TensorSpec of a supported dtype")
    size = sum(spec.numel for spec in specs)
    _check_total(total, size + 1, q.bits)
    weight = int(total[-1])
    if not 0 < weight < 1 << (q.bits - 1):
        raise SecAggError(f"the total weight is {weight}: it must be above 0 and below "
                          f"2**{q.bits - 1}")
    signed = _to_signed(total[:-1], q.bits)
    means = signed.astype(np.float64) / math.ldexp(float(weight), q.frac_bits)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        flat = torch.from_numpy(means[offset:offset + spec.numel].copy())
        out[spec.name] = _cast(flat.reshape(spec.shape), spec.dtype)
        offset += spec.numel
    return out


def _check_total(total: object, length: int, bits: int) -> None:
    if not isinstance(total, np.ndarray) or total.dtype != np.uint64 or total.ndim != 1:
        raise SecAggError("the sum must be a 1-D numpy uint64 array")
    if len(total) != length:
        raise SecAggError(f"the sum has {len(total)} elements, the specs need {length} "
                          "(their elements and the weight)")
    if bits < 64 and int(total.max()) >> bits:
        raise SecAggError(f"the sum holds a value that is not below 2**{bits}")


def _to_signed(values: Vector, bits: int) -> npt.NDArray[np.int64]:
    """Two's complement in `bits` bits: the value's top bit moved to bit 63,
    then an arithmetic shift back extends the sign (no constant like 2**bits,
    which int64 cannot hold for bits = 63)."""
    spare = 64 - bits
    shifted = np.left_shift(values, np.uint64(spare)).view(np.int64)
    return np.right_shift(shifted, np.int64(spare))


def _cast(means: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return means.to(dtype)
    rounded = torch.round(means)  # half to even
    if dtype == torch.bool:
        return rounded != 0
    info = torch.iinfo(dtype)
    # float64(2**63 - 1) is 2**63, which int64 cannot hold: the largest
    # float64 below it is the top of the clamp.
    top = float(info.max) if float(info.max) <= info.max else math.nextafter(info.max, 0)
    return rounded.clamp(float(info.min), top).to(dtype)
