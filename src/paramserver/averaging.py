"""Validation and weighted averaging of state_dicts: torch only, no I/O.

The guarantee, per dtype (the one place it is stated; README and the .proto
repeat it). Let the updates x_1..x_K have integer weights w_i (numbers of
training examples), W = sum(w_i), and the exact weighted mean
m = sum(w_i * x_i) / W, computed elementwise.

- Integer dtypes (int8/16/32/64, uint8) and bool: exactly m rounded to the
  nearest integer, ties to even (for bool: True iff the weight of True is more
  than half of W; a tie is False). Computed with integer arithmetic:
  sum(w_i * x_i), then one rounding division by W. No bound, no exception.
- float64: within
      gamma(K + 1) * sum(p_i * |x_i|) + K * 2**-1073,   gamma(n) = n*u / (1 - n*u),
  of m, where u = 2**-53 and p_i = w_i / W (the absolute term covers underflow
  in the subnormal range). The accumulator below is the result.
- float32, float16, bfloat16: the float64 accumulator (within the bound above
  of m) rounded once to the dtype, to nearest, ties to even. So the result is
  m correctly rounded, unless a rounding midpoint of the dtype lies within that
  bound of m; then it is one of the two neighbours of that midpoint. float16
  and bfloat16 are rounded once, not twice through float32 (round to odd into
  float32, then to nearest: exact for any format with at least two fewer bits
  of precision than float32).

How the float accumulator is computed, and why:
- Each update's fraction p_i = w_i / W is one correctly rounded division of
  exact integers, so scaling every weight by the same integer gives
  bit-identical fractions and results.
- Every element is accumulated in float64 as a fold over the updates in
  canonical order (sorted client ids): term_i = float64(x_i) * p_i, acc += term_i,
  as two separate elementwise operations (never a fused multiply-add). The
  result therefore depends only on the set of updates, never on arrival order
  or thread interleaving, and is the same whether a tensor is folded whole or
  in blocks: the server folds fixed-size blocks streamed from disk, so its
  memory does not grow with the number of clients.
- float64 values near the top of the range can overflow the accumulator
  although their mean is finite. Only those elements are folded again on
  halved values (then doubled, exactly): elementwise, so an element's result
  never depends on its neighbours.

Imports torch, errors and specs; must not load protobuf or grpc.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from paramserver.errors import AveragingError, MalformedUpdateError
from paramserver.specs import ModelSpec, all_finite, check_specs_match, spec_of

StateDict = Mapping[str, torch.Tensor]
Blocks = Callable[[], Iterable[torch.Tensor]]

_INT64_LIMIT = 1 << 63
_FLOAT64_MAX = torch.finfo(torch.float64).max


@dataclass(frozen=True)
class Weights:
    """The weights of one round's updates, in canonical order: the integers,
    their total and the correctly rounded fractions w_i / W."""

    counts: tuple[int, ...]
    total: int
    fractions: tuple[float, ...]

    @classmethod
    def of(cls, counts: Sequence[int]) -> Weights:
        """Raises AveragingError for no weights, a negative or non-integer
        weight, or a zero total."""
        if not counts:
            raise AveragingError("no updates to average")
        for w in counts:
            if not isinstance(w, int) or isinstance(w, bool) or w < 0:
                raise AveragingError(f"weights must be non-negative integers, got {w!r}")
        total = sum(counts)
        if total == 0:
            raise AveragingError("total weight is zero")
        # int / int is correctly rounded in Python.
        return cls(tuple(counts), total, tuple(w / total for w in counts))


def weight_fractions(weights: Sequence[int]) -> list[float]:
    """p_i = w_i / sum(w), correctly rounded. Raises AveragingError (see Weights.of)."""
    return list(Weights.of(weights).fractions)


def fold(weights: Weights, blocks: Blocks, dtype: torch.dtype) -> torch.Tensor:
    """The weighted mean of the blocks that `blocks()` yields (one per update,
    in the order of `weights`, consumed lazily one at a time) as `dtype`, with
    the guarantee of the module docstring. Elementwise: folding a tensor whole
    or in slices gives the same bits. `blocks()` may be called more than once
    (a second pass for the rare cases that need one)."""
    if dtype.is_floating_point:
        return round_float(fold_to_float64(weights.fractions, blocks), dtype)
    return fold_integers(weights, blocks).to(dtype)


# -- floats ------------------------------------------------------------------------


def fold_to_float64(fractions: Sequence[float], blocks: Blocks) -> torch.Tensor:
    """The float64 accumulator of the guarantee, before its rounding to the
    dtype (`round_float`): for strategies that go on from it."""
    acc = _fold(fractions, blocks(), 1.0)
    if all_finite(acc):
        return acc
    # Only float64 inputs can get here. Refold just the elements that
    # overflowed, on halved values: the others keep their first result.
    halved = _fold(fractions, blocks(), 0.5).mul_(2.0).clamp_(-_FLOAT64_MAX, _FLOAT64_MAX)
    return torch.where(torch.isfinite(acc), acc, halved)


def _fold(fractions: Sequence[float], blocks: Iterable[torch.Tensor],
          scale: float) -> torch.Tensor:
    # Two float64 buffers for the whole fold, updated in place: allocating a
    # fresh term per update fragments the heap so that RSS grows with clients.
    acc: torch.Tensor | None = None
    term: torch.Tensor | None = None
    for p, block in zip(fractions, blocks, strict=True):
        if acc is None:
            acc = torch.empty(block.shape, dtype=torch.float64).copy_(block)
            if scale != 1.0:
                acc.mul_(scale)
            acc.mul_(p)
            continue
        if term is None:
            term = torch.empty(block.shape, dtype=torch.float64)
        term.copy_(block)
        if scale != 1.0:
            term.mul_(scale)
        acc.add_(term.mul_(p))
    if acc is None:
        raise AveragingError("no updates to average")
    return acc


def round_float(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded once to the float `dtype`, to nearest, ties to even."""
    if dtype == torch.float64:
        return acc
    if dtype == torch.float32:
        return acc.to(torch.float32)  # one IEEE conversion: round to nearest even
    # torch converts float64 to float16/bfloat16 through float32, rounding to
    # nearest twice. Rounding to odd into float32 first keeps a sticky bit that
    # makes the second rounding the correct one.
    return _round_to_odd_float32(acc).to(dtype)


def _round_to_odd_float32(acc: torch.Tensor) -> torch.Tensor:
    nearest = acc.to(torch.float32)
    back = nearest.to(torch.float64)
    inexact = back != acc
    # Toward zero where rounding to nearest went away from it...
    away = inexact & (back.abs() > acc.abs())
    toward_zero = torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    # ...then the last bit set wherever the value was not exact.
    bits = toward_zero.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


# -- integers and bools ---------------------------------------------------------------


def fold_integers(weights: Weights, blocks: Blocks) -> torch.Tensor:
    """round_half_even(sum(w_i * x_i) / W) as int64, exactly. In int64 tensors
    while sum(w_i * |x_i|) provably stays below 2**63 (always, for models'
    integer buffers), else with Python integers (slow, exact)."""
    if weights.total >= _INT64_LIMIT >> 2:
        return _fold_exact_integers(weights, blocks)
    acc: torch.Tensor | None = None
    bound = 0  # a bound on sum(w_i * |x_i|) so far, in Python integers
    for w, block in zip(weights.counts, blocks(), strict=True):
        term = block.to(torch.int64, copy=True)  # never in place on the caller's block
        bound += w * _max_abs(term)
        if bound >= _INT64_LIMIT:
            return _fold_exact_integers(weights, blocks)
        term.mul_(w)
        acc = term if acc is None else acc.add_(term)
    if acc is None:
        raise AveragingError("no updates to average")
    return _divide_half_even(acc, weights.total)


def _max_abs(x: torch.Tensor) -> int:
    if x.numel() == 0:
        return 0
    low, high = torch.aminmax(x)
    return max(-int(low.item()), int(high.item()))


def _divide_half_even(total: torch.Tensor, divisor: int) -> torch.Tensor:
    """total / divisor rounded to nearest, ties to even; |total| < 2**63 and
    divisor < 2**61, so nothing below overflows."""
    quotient = torch.div(total, divisor, rounding_mode="floor")
    twice_remainder = (total - quotient * divisor).mul_(2)  # in [0, 2 * divisor)
    odd = quotient.remainder(2).ne(0)
    up = twice_remainder.gt(divisor) | (twice_remainder.eq(divisor) & odd)
    return quotient.add_(up.to(torch.int64))


def _fold_exact_integers(weights: Weights, blocks: Blocks) -> torch.Tensor:
    sums: list[int] | None = None
    shape: torch.Size | None = None
    for w, block in zip(weights.counts, blocks(), strict=True):
        shape = block.shape
        values = block.to(torch.int64).flatten().tolist()
        sums = [w * v for v in values] if sums is None else [
            s + w * v for s, v in zip(sums, values, strict=True)]
    if sums is None or shape is None:
        raise AveragingError("no updates to average")
    rounded = [_round_half_even(s, weights.total) for s in sums]
    return torch.tensor(rounded, dtype=torch.int64).reshape(shape)


def _round_half_even(numerator: int, divisor: int) -> int:
    quotient, remainder = divmod(numerator, divisor)
    if 2 * remainder > divisor or (2 * remainder == divisor and quotient % 2):
        quotient += 1
    return quotient


# -- whole state_dicts ------------------------------------------------------------------


def check_finite(state_dict: StateDict) -> None:
    """Raises MalformedUpdateError naming the first tensor with NaN or Inf."""
    for name, tensor in state_dict.items():
        if tensor.dtype.is_floating_point and not all_finite(tensor):
            raise MalformedUpdateError("contains NaN or Inf", tensor=name)


def validate_state_dict(state_dict: StateDict, expected: ModelSpec) -> None:
    """Raises MalformedUpdateError unless `state_dict` has exactly the expected
    names (in order), dtypes and shapes, and only finite floats."""
    check_specs_match(spec_of(state_dict), expected)
    check_finite(state_dict)


def average_state_dicts(updates: Mapping[str, tuple[int, StateDict]],
                        expected: ModelSpec | None = None) -> dict[str, torch.Tensor]:
    """The weighted average of in-memory updates, keyed by client id, each a
    (weight, state_dict) pair. Visits clients in sorted order, so the mapping's
    order does not matter. `expected` defaults to the first client's specs.

    Raises AveragingError (no updates, bad weights) or MalformedUpdateError
    (mismatched names, dtypes or shapes, NaN or Inf), naming the tensor."""
    if not updates:
        raise AveragingError("no updates to average")
    order = sorted(updates)
    if expected is None:
        expected = spec_of(updates[order[0]][1])
    for client in order:
        validate_state_dict(updates[client][1], expected)
    weights = Weights.of([updates[c][0] for c in order])

    def blocks(name: str) -> Blocks:
        return lambda: _column(updates, order, name)

    return {spec.name: fold(weights, blocks(spec.name), spec.dtype) for spec in expected}


def _column(updates: Mapping[str, tuple[int, StateDict]], order: Sequence[str],
            name: str) -> Iterator[torch.Tensor]:
    return (updates[c][1][name] for c in order)


def average_metrics(fractions: Sequence[float],
                    metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Weighted means of the metrics every update reports, in the given order."""
    if not metrics:
        return {}
    keys = set(metrics[0]).intersection(*metrics[1:])
    return {k: sum(p * m[k] for p, m in zip(fractions, metrics, strict=True))
            for k in sorted(keys)}
