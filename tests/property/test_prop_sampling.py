"""Client sampling is a function of (seed, round, the set of names) alone, and
uniform: checked with a chi-square test over a fixed range of seeds (the same
samples on every run, so it cannot flake)."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from property_strategies import client_names

from paramserver.sampling import Sampling, select


@given(st.integers(0, 2**63), st.integers(1, 10**6),
       st.lists(client_names, min_size=1, max_size=30, unique=True), st.integers(0, 35),
       st.randoms(use_true_random=False))
def test_a_sample_depends_on_seed_round_and_the_set_of_names_only(
        seed: int, round: int, names: list[str], size: int, rng: object) -> None:
    shuffled = list(names)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    sample = select(seed, round, names, size)
    assert select(seed, round, shuffled, size) == sample
    assert select(seed, round, names + names, size) == sample  # a set: duplicates do not count
    assert len(sample) == min(size, len(names))
    assert sample <= set(names)
    assert select(seed, round, names, size + 1) >= sample  # growing the sample keeps it


# Chi-square critical values at p = 0.001 (an honest sampler fails this one
# run in a thousand; the seeds are fixed, so this run is decided once).
CHI2_999 = {9: 27.877, 44: 78.750}


def chi_square(counts: Counter[object], categories: list[object]) -> float:
    """Pearson's statistic for `counts` against a uniform draw over `categories`."""
    expected = sum(counts.values()) / len(categories)
    assert set(counts) <= set(categories)
    return sum((counts[c] - expected) ** 2 / expected for c in categories)


def test_every_client_is_drawn_equally_often() -> None:
    names = [f"client{i}" for i in range(10)]
    counts: Counter[object] = Counter()
    trials = 3000
    for seed in range(trials):
        counts.update(select(seed, 1, names, 3))
    assert sum(counts.values()) == 3 * trials
    assert chi_square(counts, list(names)) < CHI2_999[9], counts


def test_every_pair_is_drawn_equally_often() -> None:
    """Not only each client: each 2-subset of 10 (45 of them) is equally
    likely, as for a uniform draw of a subset."""
    names = [f"c{i}" for i in range(10)]
    counts: Counter[object] = Counter()
    trials = 9000
    for seed in range(trials):
        counts[tuple(sorted(select(seed, 7, names, 2)))] += 1
    pairs: list[object] = list(itertools.combinations(names, 2))
    assert chi_square(counts, pairs) < CHI2_999[len(pairs) - 1], counts


def test_a_fraction_draws_at_least_the_minimum() -> None:
    sampling = Sampling(seed=3, fraction=0.1, minimum=2)
    for available in range(2, 40):
        names = frozenset(f"n{i}" for i in range(available))
        cohort = sampling.cohort(5, names)
        assert len(cohort) == max(2, -(-available // 10))
