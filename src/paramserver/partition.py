"""Splitting a dataset among clients: IID, Dirichlet label skew, shards per
client and quantity skew. Every partition is a function of (its parameters,
the seed, the number of parts) alone: the same on every machine and in every
process, so a client takes part i of n by its index.

Each returns n sorted lists of indices that are disjoint and together cover
every index, and every part has at least `min_size` items when that is
possible. Pure: standard library only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

Parts = list[list[int]]


class PartitionError(ValueError):
    """A partition that cannot be made (more parts than items, a bad parameter)."""


def _rng(kind: str, seed: int, parts: int, *more: object) -> random.Random:
    # Seeding with a string hashes it with SHA-512: stable across processes.
    return random.Random(f"{kind}:{seed}:{parts}:" + ":".join(map(str, more)))


def _check(items: int, parts: int, min_size: int) -> None:
    if parts < 1:
        raise PartitionError(f"need at least one part, got {parts}")
    if items < parts * min_size:
        raise PartitionError(f"{items} items cannot give {parts} parts of at least {min_size}")


def iid(items: int, parts: int, seed: int) -> Parts:
    """A uniform random permutation cut into `parts` sizes that differ by at most one."""
    _check(items, parts, 1)
    order = list(range(items))
    _rng("iid", seed, parts).shuffle(order)
    return [sorted(order[i::parts]) for i in range(parts)]


def dirichlet(labels: Sequence[int], parts: int, alpha: float, seed: int,
              min_size: int = 1, attempts: int = 100) -> Parts:
    """Label skew (Hsu et al. 2019, "Measuring the Effects of Non-Identical
    Data Distribution"): for every class, its items are split among the parts
    in proportions drawn from Dirichlet(alpha, ..., alpha). Small alpha: each
    part holds few classes; large alpha: close to IID. Draws again (up to
    `attempts` times, from the same seeded stream) until every part has
    `min_size` items, then moves single items from the largest parts."""
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    _check(len(labels), parts, min_size)
    rng = _rng("dirichlet", seed, parts, alpha)
    by_class = _by_class(labels, rng)
    for _ in range(attempts):
        result: Parts = [[] for _ in range(parts)]
        for members in by_class:
            shares = [rng.gammavariate(alpha, 1.0) for _ in range(parts)]
            for part, chunk in enumerate(_cut(members, shares)):
                result[part] += chunk
        if min(len(p) for p in result) >= min_size:
            break
    return _even_out(result, min_size)


def shards(labels: Sequence[int], parts: int, per_part: int, seed: int) -> Parts:
    """McMahan et al. 2017 ("Communication-Efficient Learning"): sort the items
    by label, cut them into parts x per_part shards of equal size (give or take
    one), and give each part per_part shards drawn at random."""
    if per_part < 1:
        raise PartitionError(f"shards per part must be at least 1, got {per_part}")
    count = parts * per_part
    _check(len(labels), count, 1)
    ordered = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    cuts = [len(ordered) * k // count for k in range(count + 1)]
    pieces = [ordered[cuts[k]:cuts[k + 1]] for k in range(count)]
    _rng("shards", seed, parts, per_part).shuffle(pieces)
    return [sorted(i for piece in pieces[p * per_part:(p + 1) * per_part] for i in piece)
            for p in range(parts)]


def quantity_skew(items: int, parts: int, alpha: float, seed: int, min_size: int = 1) -> Parts:
    """Quantity skew: part sizes in proportions drawn from Dirichlet(alpha)
    (each at least `min_size`), the items themselves IID."""
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    _check(items, parts, min_size)
    rng = _rng("quantity", seed, parts, alpha)
    order = list(range(items))
    rng.shuffle(order)
    shares = [rng.gammavariate(alpha, 1.0) for _ in range(parts)]
    spare = items - parts * min_size  # beyond the minimum, in proportion to the shares
    sizes = [min_size + len(c) for c in _cut(list(range(spare)), shares)]
    starts = [sum(sizes[:p]) for p in range(parts)]
    return [sorted(order[starts[p]:starts[p] + sizes[p]]) for p in range(parts)]


def _by_class(labels: Sequence[int], rng: random.Random) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    out = []
    for label in sorted(groups):
        members = groups[label]
        rng.shuffle(members)
        out.append(members)
    return out


def _cut(members: list[int], shares: Sequence[float]) -> list[list[int]]:
    """`members` cut into consecutive pieces in proportion to `shares`."""
    total = sum(shares) or 1.0
    bounds, acc = [0], 0.0
    for share in shares:
        acc += share
        bounds.append(round(len(members) * acc / total))
    bounds[-1] = len(members)
    return [members[bounds[p]:bounds[p + 1]] for p in range(len(shares))]


def _even_out(result: Parts, min_size: int) -> Parts:
    """Moves single items from the largest parts to those under `min_size`."""
    for part in result:
        while len(part) < min_size:
            largest = max(range(len(result)), key=lambda p: (len(result[p]), -p))
            part.append(result[largest].pop())
    return [sorted(p) for p in result]


# -- by name, for the command line ------------------------------------------------------


def parse(spec: str) -> Callable[[Sequence[int], int, int], Parts]:
    """`iid`, `dirichlet:ALPHA`, `shards:PER_CLIENT` or `quantity:ALPHA` as a
    function of (labels, parts, seed). Raises PartitionError."""
    kind, _, value = spec.partition(":")
    try:
        if kind == "iid" and not value:
            return lambda labels, parts, seed: iid(len(labels), parts, seed)
        if kind == "dirichlet":
            alpha = float(value)
            return lambda labels, parts, seed: dirichlet(labels, parts, alpha, seed)
        if kind == "shards":
            per_part = int(value)
            return lambda labels, parts, seed: shards(labels, parts, per_part, seed)
        if kind == "quantity":
            alpha = float(value)
            return lambda labels, parts, seed: quantity_skew(len(labels), parts, alpha, seed)
    except ValueError:
        pass
    raise PartitionError(f"unknown partition {spec!r}: use iid, dirichlet:ALPHA, "
                         "shards:PER_CLIENT or quantity:ALPHA")
