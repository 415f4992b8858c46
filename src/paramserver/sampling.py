"""Which clients take part in a round: a function of (seed, round, the set of
available client names) alone, never of registration order, timing or
Python's global random state.

Each name gets a key, SHA-256 of (purpose, seed, round, name); the sample is
the names with the smallest keys. With SHA-256 as a random oracle, every
subset of the requested size is equally likely, each name is in it with
probability size / available, and the same inputs give the same sample on
every machine. Training and evaluation cohorts use different purposes, so they
are drawn independently.

Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass


def select(seed: int, round: int, available: Iterable[str], size: int,
           purpose: str = "train") -> frozenset[str]:
    """The `size` names of `available` with the smallest keys (all of them if
    there are no more)."""
    def key(name: str) -> bytes:
        return hashlib.sha256(f"{purpose}\0{seed}\0{round}\0{name}".encode()).digest()

    return frozenset(sorted(set(available), key=key)[:max(size, 0)])


@dataclass(frozen=True)
class Sampling:
    """`fraction` or `size` of the available clients, at least `minimum`."""

    seed: int = 0
    fraction: float | None = None
    size: int | None = None
    minimum: int = 1

    def __post_init__(self) -> None:
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("the sample fraction must be in (0, 1]")
        if self.size is not None and self.size < 1:
            raise ValueError("the sample size must be at least 1")
        if self.fraction is not None and self.size is not None:
            raise ValueError("give a sample fraction or a sample size, not both")

    def count(self, available: int) -> int:
        if self.size is not None:
            wanted = self.size
        elif self.fraction is not None:
            wanted = math.ceil(self.fraction * available)
        else:
            wanted = available
        return min(available, max(wanted, self.minimum))

    def cohort(self, round: int, available: frozenset[str],
               purpose: str = "train") -> frozenset[str]:
        return select(self.seed, round, available, self.count(len(available)), purpose)
