"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2**521 - 1.

Owns: splitting a secret of at most 64 bytes into shares, the fixed-size byte
encoding of one share, and reconstruction with a consistency check. p is a
Mersenne prime above 2**512, so every 64-byte secret is a field element.

Any t shares determine the secret; t - 1 shares say nothing about it (the
coefficients are uniform in [0, p)). When more than t shares are combined,
every share beyond the first t must lie on the polynomial through those t, so
a tampered share is detected; with exactly t shares it cannot be.

Pure: imports the standard library and paramserver.errors only. No numpy,
torch, grpc, threads, clocks or I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from paramserver.errors import SecAggError, quote

PRIME = 2**521 - 1
FIELD_BYTES = 66  # ceil(521 / 8): one field element, big-endian
SHARE_SIZE = 2 * FIELD_BYTES  # x then y
MAX_SECRET_BYTES = 64
_FIELD_BITS = (1 << 521) - 1
# Rejection sampling rejects one value in 2**521; a source that keeps hitting
# it is broken, and looping forever on it would hang the caller.
_MAX_DRAWS = 8

Rng = Callable[[int], bytes]


@dataclass(frozen=True)
class Share:
    """The point (x, y) of the sharing polynomial; x is the holder's index (1..n)."""

    x: int
    y: int


def share_to_bytes(share: Share) -> bytes:
    """x then y, each 66 bytes big-endian: always SHARE_SIZE bytes.
    Raises SecAggError for a share outside the field."""
    _check_share(share)
    return share.x.to_bytes(FIELD_BYTES, "big") + share.y.to_bytes(FIELD_BYTES, "big")


def share_from_bytes(data: bytes | bytearray | memoryview) -> Share:
    """The inverse of share_to_bytes. Raises SecAggError for anything that is
    not SHARE_SIZE bytes encoding x in 1..p-1 and y in 0..p-1."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SecAggError(f"a share must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != SHARE_SIZE:
        raise SecAggError(f"a share is {SHARE_SIZE} bytes, got {len(data)}")
    share = Share(int.from_bytes(data[:FIELD_BYTES], "big"),
                  int.from_bytes(data[FIELD_BYTES:], "big"))
    _check_share(share)
    return share


def _check_share(share: object) -> None:
    if not isinstance(share, Share):
        raise SecAggError(f"expected a Share, got {type(share).__name__}")
    if type(share.x) is not int or not 1 <= share.x < PRIME:
        raise SecAggError(f"share index x={quote(share.x)} is outside 1..p-1")
    if type(share.y) is not int or not 0 <= share.y < PRIME:
        raise SecAggError(f"the value of share x={share.x} is outside the field")


def random_element(rng: Rng = os.urandom) -> int:
    """A uniform element of [0, p): 521 random bits, rejecting the one value
    (p itself) that is out of range, so there is no modulo bias."""
    for _ in range(_MAX_DRAWS):
        data = rng(FIELD_BYTES)
        if len(data) != FIELD_BYTES:
            raise SecAggError(f"the random source gave {len(data)} bytes, "
                              f"{FIELD_BYTES} were asked for")
        value = int.from_bytes(data, "big") & _FIELD_BITS
        if value < PRIME:
            return value
    raise SecAggError(f"the random source gave p = 2**521 - 1 {_MAX_DRAWS} times in a row")


def split(secret: bytes, threshold: int, xs: Sequence[int],
          rng: Rng = os.urandom) -> dict[int, Share]:
    """Shares of `secret` (<= 64 bytes, read big-endian) for the holders `xs`,
    any `threshold` of which reconstruct it. Raises SecAggError for a secret
    too long, a threshold outside 1..len(xs), or xs not distinct in 1..p-1."""
    _check_split(secret, threshold, xs)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [random_element(rng) for _ in range(threshold - 1)]
    return {x: Share(x, _horner(coefficients, x)) for x in xs}


def _check_split(secret: bytes, threshold: int, xs: Sequence[int]) -> None:
    if not isinstance(secret, bytes | bytearray) or len(secret) > MAX_SECRET_BYTES:
        raise SecAggError(f"a secret must be at most {MAX_SECRET_BYTES} bytes")
    if type(threshold) is not int or not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {quote(threshold)} is outside 1..{len(xs)} "
                          f"(the number of holders)")
    if len(set(xs)) != len(xs):
        raise SecAggError("the holders' indices are not distinct")
    for x in xs:
        if type(x) is not int or not 1 <= x < PRIME:
            raise SecAggError(f"holder index {quote(x)} is outside 1..p-1")


def _horner(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def combine(shares: Collection[Share], threshold: int, length: int) -> bytes:
    """The secret (`length` bytes, big-endian) from at least `threshold`
    distinct shares, by Lagrange interpolation at 0 through the `threshold`
    shares of lowest x.

    Raises SecAggError if there are fewer than `threshold` distinct shares, two
    different shares for one x, a share beyond the first `threshold` that is
    not on their polynomial, or a result that does not fit in `length` bytes.
    """
    if type(threshold) is not int or threshold < 1:
        raise SecAggError(f"threshold {quote(threshold)} must be a positive integer")
    if type(length) is not int or not 0 <= length <= MAX_SECRET_BYTES:
        raise SecAggError(f"secret length {quote(length)} is outside 0..{MAX_SECRET_BYTES}")
    points = _distinct_points(shares)
    if len(points) < threshold:
        raise SecAggError(f"{len(points)} shares, the threshold is {threshold}")
    basis = points[:threshold]
    weights = _barycentric_weights([x for x, _ in basis])
    for x, y in points[threshold:]:
        if _interpolate(basis, weights, x) != y:
            raise SecAggError(f"share x={x} is not on the polynomial through the first "
                              f"{threshold} shares: at least one share was tampered with")
    secret = _interpolate(basis, weights, 0)
    if secret >> (8 * length):
        raise SecAggError(f"the reconstructed secret does not fit in {length} bytes: a share "
                          "was tampered with, or the threshold is not the one it was split with")
    return secret.to_bytes(length, "big")


def _distinct_points(shares: Collection[Share]) -> list[tuple[int, int]]:
    points: dict[int, int] = {}
    for share in shares:
        _check_share(share)
        if points.setdefault(share.x, share.y) != share.y:
            raise SecAggError(f"two different shares with index x={share.x}")
    return sorted(points.items())


def _barycentric_weights(xs: Sequence[int]) -> list[int]:
    """w_i = 1 / prod_{j != i} (x_i - x_j): computed once, so that evaluating
    the interpolating polynomial at another point needs no inversion."""
    weights = []
    for i, xi in enumerate(xs):
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return weights


def _interpolate(basis: Sequence[tuple[int, int]], weights: Sequence[int], x: int) -> int:
    """f(x) = sum_i y_i * w_i * prod_{j != i} (x - x_j), for x not in the basis.
    The product over all j is kept as an exact integer, so each term's product
    is one exact division by (x - x_i) instead of a modular inverse."""
    everything = 1
    for xj, _ in basis:
        everything *= x - xj
    total = 0
    for (xi, yi), wi in zip(basis, weights, strict=True):
        total += yi * wi % PRIME * (everything // (x - xi))
    return total % PRIME
