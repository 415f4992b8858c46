"""Partitions are disjoint, cover the data, give every part its minimum, are
functions of (parameters, seed, number of parts) alone, and follow the
distribution they promise (checked over fixed seeds, so they cannot flake)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paramserver import partition

labels_strategy = st.lists(st.integers(0, 9), min_size=20, max_size=300)


def check_partition(parts: Sequence[Sequence[int]], items: int, count: int,
                    min_size: int = 1) -> None:
    assert len(parts) == count
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(items)), "not disjoint, or not covering every item"
    assert all(list(part) == sorted(part) for part in parts)
    assert all(len(part) >= min_size for part in parts)


@given(st.integers(1, 500), st.integers(1, 20), st.integers(0, 2**32))
def test_iid(items: int, count: int, seed: int) -> None:
    if items < count:
        with pytest.raises(partition.PartitionError):
            partition.iid(items, count, seed)
        return
    parts = partition.iid(items, count, seed)
    check_partition(parts, items, count)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition.iid(items, count, seed) == parts


@given(labels_strategy, st.integers(1, 10), st.sampled_from([0.05, 0.5, 1.0, 100.0]),
       st.integers(0, 2**32))
def test_dirichlet(labels: list[int], count: int, alpha: float, seed: int) -> None:
    parts = partition.dirichlet(labels, count, alpha, seed)
    check_partition(parts, len(labels), count)
    assert partition.dirichlet(labels, count, alpha, seed) == parts


@given(labels_strategy, st.integers(1, 8), st.integers(1, 3), st.integers(0, 2**32))
def test_shards(labels: list[int], count: int, per_part: int, seed: int) -> None:
    if len(labels) < count * per_part:
        return
    parts = partition.shards(labels, count, per_part, seed)
    check_partition(parts, len(labels), count)
    # per_part shards, each of the same size give or take one.
    size = len(labels) // (count * per_part)
    assert all(abs(len(p) - per_part * size) <= per_part for p in parts)


@given(st.integers(10, 500), st.integers(1, 10), st.sampled_from([0.1, 1.0, 10.0]),
       st.integers(0, 2**32))
def test_quantity_skew(items: int, count: int, alpha: float, seed: int) -> None:
    parts = partition.quantity_skew(items, count, alpha, seed)
    check_partition(parts, items, count)


BALANCED = [label for label in range(10) for _ in range(100)]  # 1,000 items, 10 classes


def label_shares(labels: Sequence[int], part: Sequence[int]) -> list[float]:
    counts = Counter(labels[i] for i in part)
    return [counts[c] / len(part) for c in range(10)]


def test_large_alpha_is_close_to_iid_and_small_alpha_is_skewed() -> None:
    """Over 20 fixed seeds, 5 parts: with alpha 1000 every part's label shares
    are within 0.05 of the global 0.1; with alpha 0.05 a part holds few
    labels (with 10 classes over 5 parts, about 2 each: each class goes
    nearly whole to one part)."""
    for seed in range(20):
        for part in partition.dirichlet(BALANCED, 5, 1000.0, seed):
            assert max(abs(s - 0.1) for s in label_shares(BALANCED, part)) < 0.05
    present = [sum(share >= 0.05 for share in label_shares(BALANCED, part))
               for seed in range(20) for part in partition.dirichlet(BALANCED, 5, 0.05, seed)]
    assert sum(present) / len(present) < 3.5


def test_shards_give_each_part_few_labels() -> None:
    """McMahan et al.'s pathological non-IID split: 2 shards of 100 sorted
    items each, so at most 2 labels a part here (classes of exactly 100)."""
    for seed in range(10):
        for part in partition.shards(BALANCED, 5, 2, seed):
            assert len({BALANCED[i] for i in part}) <= 2


def test_quantity_skew_varies_sizes_but_not_labels() -> None:
    sizes = [len(p) for seed in range(20)
             for p in partition.quantity_skew(1000, 5, 0.2, seed)]
    assert max(sizes) > 3 * min(sizes)  # skewed
    assert min(sizes) >= 1


def test_parse_names_every_partition() -> None:
    labels = BALANCED[:50]
    for spec in ("iid", "dirichlet:0.5", "shards:2", "quantity:1.0"):
        check_partition(partition.parse(spec)(labels, 5, 0), 50, 5)
    with pytest.raises(partition.PartitionError, match="unknown partition"):
        partition.parse("dirichlet:lots")
