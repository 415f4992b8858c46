"""Shamir secret sharing over GF(2**521 - 1): round trips, refusals, tampering."""

from __future__ import annotations

import itertools
import random

import pytest

from paramserver.errors import SecAggError
from paramserver.shamir import (
    PRIME,
    SHARE_SIZE,
    Share,
    combine,
    random_element,
    share_from_bytes,
    share_to_bytes,
    split,
)

SECRET = bytes(range(1, 33))


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


def test_any_threshold_of_the_shares_rebuild_the_secret() -> None:
    shares = split(SECRET, 3, [1, 2, 3, 4, 5], seeded(1).randbytes)
    for subset in itertools.combinations(shares.values(), 3):
        assert combine(subset, 3, 32) == SECRET
    assert combine(shares.values(), 3, 32) == SECRET  # all five, consistency-checked


def test_fewer_shares_than_the_threshold_are_refused() -> None:
    shares = split(SECRET, 3, [1, 2, 3, 4, 5])
    with pytest.raises(SecAggError, match="2 shares, the threshold is 3"):
        combine([shares[1], shares[4]], 3, 32)


def test_identical_duplicates_count_once_and_conflicting_ones_are_refused() -> None:
    shares = split(SECRET, 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="1 shares, the threshold is 2"):
        combine([shares[1], shares[1]], 2, 32)
    forged = Share(1, (shares[1].y + 1) % PRIME)
    with pytest.raises(SecAggError, match="two different shares with index x=1"):
        combine([shares[1], forged, shares[2]], 2, 32)


def test_a_tampered_share_is_detected_when_more_than_the_threshold_are_combined() -> None:
    shares = split(SECRET, 3, [1, 2, 3, 4])
    tampered = [shares[1], Share(2, (shares[2].y + 1) % PRIME), shares[3], shares[4]]
    with pytest.raises(SecAggError, match="tampered"):
        combine(tampered, 3, 32)
    # With exactly the threshold it cannot be: the result is simply wrong.
    # Adding 1 to y at x=2 adds its Lagrange coefficient at 0 through
    # x = 1, 2, 3, which is (0-1)(0-3) / ((2-1)(2-3)) = -3.
    wrong = (int.from_bytes(SECRET, "big") - 3).to_bytes(32, "big")
    assert combine(tampered[:3], 3, 32) == wrong


def test_threshold_one_gives_the_secret_to_every_holder() -> None:
    shares = split(SECRET, 1, [7, 9])
    assert {s.y for s in shares.values()} == {int.from_bytes(SECRET, "big")}
    assert combine([shares[9]], 1, 32) == SECRET


def test_leading_zeros_and_the_largest_secret_survive() -> None:
    for secret in (bytes(32), b"\x00\x01", b"\xff" * 64, b""):
        shares = split(secret, 2, [1, 2, 3])
        assert combine([shares[3], shares[1]], 2, len(secret)) == secret


def test_a_result_that_does_not_fit_the_length_is_refused() -> None:
    shares = split(b"\x01\x00", 2, [1, 2])
    with pytest.raises(SecAggError, match="does not fit in 1 bytes"):
        combine(shares.values(), 2, 1)


@pytest.mark.parametrize(("secret", "threshold", "xs", "match"), [
    (bytes(65), 2, [1, 2], "at most 64 bytes"),
    (SECRET, 0, [1, 2], "threshold 0"),
    (SECRET, 3, [1, 2], "threshold 3"),
    (SECRET, 2, [1, 1], "not distinct"),
    (SECRET, 2, [0, 1], "holder index 0"),
    (SECRET, 2, [1, PRIME], "outside 1..p-1"),
])
def test_split_refuses_bad_arguments(secret: bytes, threshold: int, xs: list[int],
                                     match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        split(secret, threshold, xs)


def test_share_bytes_round_trip_and_refusals() -> None:
    share = Share(3, PRIME - 1)
    data = share_to_bytes(share)
    assert len(data) == SHARE_SIZE
    assert share_from_bytes(data) == share
    with pytest.raises(SecAggError, match=f"a share is {SHARE_SIZE} bytes, got 131"):
        share_from_bytes(data[:-1])
    with pytest.raises(SecAggError, match="x=0"):
        share_from_bytes(bytes(SHARE_SIZE))
    with pytest.raises(SecAggError, match="outside the field"):
        share_from_bytes(data[:66] + PRIME.to_bytes(66, "big"))
    with pytest.raises(SecAggError, match="outside the field"):
        share_to_bytes(Share(1, PRIME))


def test_randomness_is_injected_and_rejection_sampled() -> None:
    assert split(SECRET, 3, [1, 2, 3], seeded(5).randbytes) == split(
        SECRET, 3, [1, 2, 3], seeded(5).randbytes)
    # 0xff... masked to 521 bits is p itself: rejected, the next draw is used.
    draws = iter([b"\xff" * 66, b"\x00" * 65 + b"\x07"])
    assert random_element(lambda n: next(draws)) == 7
    with pytest.raises(SecAggError, match="2\\*\\*521 - 1 8 times"):
        random_element(lambda n: b"\xff" * n)
    with pytest.raises(SecAggError, match="gave 3 bytes"):
        random_element(lambda n: b"abc")


def test_coefficients_use_the_whole_field() -> None:
    # The top 8 bits of uniform elements of [0, 2**521 - 1): each of the 2**8
    # ranges is hit; a modulo-reduced 512-bit draw would never exceed 2**512.
    rng = seeded(9).randbytes
    tops = {random_element(rng) >> 513 for _ in range(3000)}
    assert tops == set(range(256))
