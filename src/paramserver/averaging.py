"""Validation and weighted averaging of state_dicts: torch only, no I/O.

How the average is computed, and why:
- Weights are integers (numbers of training examples). Each update's fraction
  p_i = w_i / W is one correctly rounded division of exact integers, so scaling
  every weight by the same integer gives bit-identical fractions and results.
- Every element is accumulated in float64 as a fold over the updates in
  canonical order (sorted client ids): term_i = float64(x_i) * p_i, acc += term_i,
  as two separate elementwise operations (never a fused multiply-add). The
  result therefore depends only on the set of updates, never on arrival order
  or thread interleaving, and is the same whether a tensor is folded whole or
  in blocks: the server folds fixed-size blocks streamed from disk, so its
  memory does not grow with the number of clients.
- Float entries (float32/16, bfloat16, float64) are cast back to their dtype
  (round to nearest even). For float32 and narrower the float64 accumulator
  carries far more precision than the result, so the mean of N identical copies
  is exactly the copy.
- Policy for non-float entries (int64 buffers such as BatchNorm's
  num_batches_tracked, other integers, bool): the same weighted mean, rounded
  half to even and cast back; for bool that is a weighted majority vote with
  ties going to False. Exact while the weighted terms stay exact in float64:
  for integers up to about 2**52 / (number of updates + 1) in magnitude; larger
  ones may be off by a few units (and are clamped to the dtype's range).

Imports torch, errors and codec (for specs); must not import grpc.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from paramserver.codec import ModelSpec, all_finite, check_specs_match, spec_of
from paramserver.errors import AveragingError, MalformedUpdateError

StateDict = Mapping[str, torch.Tensor]


def weight_fractions(weights: Sequence[int]) -> list[float]:
    """p_i = w_i / sum(w). Raises AveragingError for no weights, a negative or
    non-integer weight, or a zero total."""
    if not weights:
        raise AveragingError("no updates to average")
    for w in weights:
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise AveragingError(f"weights must be non-negative integers, got {w!r}")
    total = sum(weights)
    if total == 0:
        raise AveragingError("total weight is zero")
    return [w / total for w in weights]  # int / int is correctly rounded in Python


def fold(fractions: Sequence[float], blocks: Callable[[], Iterable[torch.Tensor]],
         dtype: torch.dtype) -> torch.Tensor:
    """The weighted sum of the blocks that `blocks()` yields (consumed lazily,
    one at a time), cast to `dtype` by the module's policy. Elementwise: folding
    a tensor whole or in slices gives the same bits.

    float64 values near the top of the range can overflow the float64
    accumulator although their average is finite; then, and only then, the
    fold runs again on halved values (`blocks()` is called a second time),
    doubles the result (exact), and clamps to the finite range what the
    rounded fractions pushed past it (the true average never exceeds it)."""
    acc = _fold(fractions, blocks(), 1.0)
    if dtype == torch.float64 and not all_finite(acc):
        top = torch.finfo(torch.float64).max
        acc = _fold(fractions, blocks(), 0.5).mul_(2.0).clamp_(-top, top)
    return cast_result(acc, dtype)


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


def cast_result(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return acc.to(dtype)
    if dtype == torch.bool:
        return torch.round(acc).to(dtype)
    # Clamp to the largest float64 values inside the integer range: float64(2**63 - 1)
    # is 2**63, which would wrap around to the most negative int64 on the cast.
    info = torch.iinfo(dtype)
    lo, hi = (torch.tensor(float(v), dtype=torch.float64) for v in (info.min, info.max))
    hi = torch.nextafter(hi, lo) if int(hi.item()) > info.max else hi
    return torch.round(acc).clamp_(lo, hi).to(dtype)


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
    fractions = weight_fractions([updates[c][0] for c in order])
    def blocks(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (updates[c][1][name] for c in order)

    return {spec.name: fold(fractions, blocks(spec.name), spec.dtype) for spec in expected}


def average_metrics(fractions: Sequence[float],
                    metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Weighted means of the metrics every update reports, in the given order."""
    if not metrics:
        return {}
    keys = set(metrics[0]).intersection(*metrics[1:])
    return {k: sum(p * m[k] for p, m in zip(fractions, metrics, strict=True))
            for k in sorted(keys)}
