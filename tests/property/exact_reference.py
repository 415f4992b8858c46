"""Exact arithmetic for the property tests: the weighted mean as a Fraction,
the stated float64 bound, and correct rounding to each float format, computed
without floats on the way (no double rounding)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch


def exact_average(values: Sequence[Sequence[float | int | bool]],
                  ws: Sequence[int]) -> list[Fraction]:
    """m = sum(w_i * x_i) / sum(w_i) per element, exactly."""
    total = sum(ws)
    return [sum((Fraction(w) * Fraction(v) for w, v in zip(ws, column, strict=True)),
                Fraction(0)) / total
            for column in zip(*values, strict=True)]


U = Fraction(1, 2**53)


def float64_bound(ws: Sequence[int], column: Sequence[float]) -> Fraction:
    """The stated bound on |float64 accumulator - m|:
    gamma(K + 1) * sum(p_i * |x_i|) + K * 2**-1073."""
    k, total = len(ws), sum(ws)
    gamma = (k + 1) * U / (1 - (k + 1) * U)
    weighted = sum((Fraction(w, total) * abs(Fraction(x))
                    for w, x in zip(ws, column, strict=True)), Fraction(0))
    return gamma * weighted + k * Fraction(1, 2**1073)


# (precision in bits, smallest normal exponent) of each float format.
FORMATS = {torch.float64: (53, -1022), torch.float32: (24, -126),
           torch.float16: (11, -14), torch.bfloat16: (8, -126)}


def floor_log2(a: Fraction) -> int:
    e = a.numerator.bit_length() - a.denominator.bit_length()
    return e if Fraction(2) ** e <= a else e - 1


def round_to(q: Fraction, dtype: torch.dtype) -> Fraction:
    """q rounded to the nearest value of the float format, ties to even,
    computed exactly (no float on the way: no double rounding)."""
    if q == 0:
        return Fraction(0)
    precision, emin = FORMATS[dtype]
    ulp = Fraction(2) ** (max(floor_log2(abs(q)), emin) - precision + 1)
    return round(q / ulp) * ulp  # round() of a Fraction is half to even


def check_mean(result: torch.Tensor, rows: Sequence[Sequence[float | int | bool]],
               ws: Sequence[int], what: str) -> None:
    """averaging.py's guarantee for a weighted mean of `rows` (one row per
    update, flattened) with weights `ws`, element by element:
    integers and bools: m rounded half to even, exactly;
    float64: within float64_bound of m;
    narrower floats: the float64 accumulator (within that bound of m) rounded
    once to the dtype: between the roundings of m - bound and m + bound, which
    is m correctly rounded unless a rounding midpoint lies in that interval."""
    exact = exact_average(rows, ws)
    got = result.flatten().tolist()
    assert len(got) == len(exact)
    dtype = result.dtype
    for i, (g, m) in enumerate(zip(got, exact, strict=True)):
        where = f"{what}[{i}] = {g!r}, exact mean {float(m)!r}"
        if not dtype.is_floating_point:
            assert int(g) == round(m), where
            continue
        assert math.isfinite(g), where
        bound = float64_bound(ws, [row[i] for row in rows])
        if dtype == torch.float64:
            assert abs(Fraction(g) - m) <= bound, f"{where}, bound {float(bound)!r}"
        else:
            lo, hi = round_to(m - bound, dtype), round_to(m + bound, dtype)
            assert lo <= Fraction(g) <= hi, f"{where}: not rounded once to {dtype}"
            if lo == hi:
                assert Fraction(g) == round_to(m, dtype), where
