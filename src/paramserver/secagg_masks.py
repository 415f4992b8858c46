"""The masks of secure aggregation: vectors of integers mod 2**bits, the
pseudorandom expansion of a seed into a mask, the sign of a pairwise mask, the
SecAgg+ neighbour graph and the default threshold.

Vectors are 1-D numpy uint64 arrays holding values in [0, 2**bits). All
arithmetic is done mod 2**64 (numpy's uint64 wraps) and reduced to the low
`bits` bits at the end: 2**bits divides 2**64, so the two agree.

Pure: imports the standard library, numpy, cryptography and paramserver.errors.
Never torch, grpc, threads, sockets, clocks or files.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from paramserver.errors import SecAggError, quote

Vector = npt.NDArray[np.uint64]
Graph = dict[str, frozenset[str]]

SEED_SIZE = 32
# ChaCha20 in `cryptography` takes a 16-byte nonce: a 4-byte block counter then
# 12 bytes of nonce. All zero: every seed is expanded into exactly one mask
# stream (b_u masks only y_u; s_uv is the one stream u adds and v subtracts),
# and seeds are fresh every round, so no (key, nonce) pair ever covers two
# different streams. The 32-bit counter limits a mask to 2**35 elements.
_NONCE = bytes(16)
MAX_LENGTH = 2**35


def check_bits(bits: int) -> None:
    if type(bits) is not int or not 1 <= bits <= 64:
        raise SecAggError(f"bits must be an integer in 1..64, got {quote(bits)}")


def low_bits(bits: int) -> np.uint64:
    """The mask of the low `bits` bits."""
    return np.uint64((1 << bits) - 1)


def reduce(vector: Vector, bits: int) -> Vector:
    """`vector` mod 2**bits, in place."""
    if bits < 64:
        np.bitwise_and(vector, low_bits(bits), out=vector)
    return vector


def check_vector(vector: object, bits: int, whose: str, length: int | None = None) -> Vector:
    """`vector` if it is a 1-D uint64 array of values below 2**bits (and of
    `length` elements if given). Raises SecAggError naming `whose`."""
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.ndim != 1:
        got = (f"{vector.ndim}-D {vector.dtype}" if isinstance(vector, np.ndarray)
               else type(vector).__name__)
        raise SecAggError(f"{whose}: expected a 1-D numpy uint64 array, got {got}")
    if length is not None and len(vector) != length:
        raise SecAggError(f"{whose}: {len(vector)} elements, expected {length}")
    if bits < 64 and len(vector) and int(vector.max()) >> bits:
        raise SecAggError(f"{whose}: element {int(vector.max())} is not below 2**{bits}")
    return vector


def plain_sum(vectors: Iterable[Vector], bits: int = 64) -> Vector:
    """The elementwise sum mod 2**bits, without any masking: the reference
    the unmasked sum must equal. Raises SecAggError for no vectors or
    vectors of different lengths or types."""
    check_bits(bits)
    total: Vector | None = None
    for i, vector in enumerate(vectors):
        check_vector(vector, 64, f"vector {i}", None if total is None else len(total))
        if total is None:
            total = vector.copy()
        else:
            np.add(total, vector, out=total)
    if total is None:
        raise SecAggError("no vectors to sum")
    return reduce(total, bits)


def expand(seed: bytes, length: int, bits: int) -> Vector:
    """The mask of `length` elements that `seed` (32 bytes) stands for: the
    ChaCha20 keystream read as little-endian uint64, reduced mod 2**bits."""
    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise SecAggError(f"a mask seed is {SEED_SIZE} bytes")
    if not 0 <= length <= MAX_LENGTH:
        raise SecAggError(f"a mask has at most {MAX_LENGTH} elements, {length} were asked for")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    raw = stream.update(bytes(8 * length))
    return reduce(np.frombuffer(raw, dtype="<u8").astype(np.uint64), bits)


def pair_sign(client: str, other: str) -> int:
    """+1 if `client` adds the mask it shares with `other`, -1 if it subtracts
    it: the smaller name (as str) adds, so the pair cancels in the sum."""
    return 1 if client < other else -1


def threshold_for(n: int) -> int:
    """The default threshold for a neighbourhood of n clients (itself
    included): floor(n / 2) + 1, a strict majority (2 for n = 2 or 3).

    Why a majority: a client never reveals both kinds of share for one peer
    (secagg.SecAggClient.reveal), so a server that tells some clients "v
    dropped" and others "v survived" needs two disjoint groups of at least t
    honest clients each; with t > n/2 there are not enough. With c colluding
    clients the bound becomes t > (n + c) / 2: Bonawitz et al. suggest
    t > 2n/3 (safe against n/3 colluders) at the cost of tolerating fewer
    dropouts. Pass another threshold where that trade-off is wanted.
    Raises SecAggError for n < 1."""
    if type(n) is not int or n < 1:
        raise SecAggError(f"a neighbourhood has at least one client, got {quote(n)}")
    return n // 2 + 1


def full_graph(names: Collection[str]) -> Graph:
    """Everyone is everyone's neighbour (the original protocol)."""
    everyone = frozenset(names)
    return {name: everyone - {name} for name in everyone}


def neighbours(names: Collection[str], k: int, seed: bytes) -> Graph:
    """The SecAgg+ graph (Bell et al. 2020): the names on a cycle in a
    pseudorandom order keyed by `seed` (sorted by HMAC-SHA256(seed, name)),
    each linked to the k/2 before it and the k/2 after it. Symmetric, no self
    loops, exactly k-regular when k < n - 1; the full graph when k >= n - 1.

    With Bell et al.'s parameters (k = O(log n), threshold a fraction of
    k + 1) privacy and dropout robustness hold with high probability over the
    random graph, not always; the seed must be random and fixed after the
    clients are known. Raises SecAggError for duplicate names, an odd k or
    k < 2, or a seed that is not bytes."""
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        raise SecAggError("the names of the neighbour graph are not distinct")
    if type(k) is not int or k < 2 or k % 2:
        raise SecAggError(f"k (the number of neighbours) must be even and at least 2, "
                          f"got {quote(k)}")
    if not isinstance(seed, bytes):
        raise SecAggError("the seed of the neighbour graph must be bytes")
    if k >= len(ordered) - 1:
        return full_graph(ordered)
    cycle = sorted(ordered, key=lambda name: (_rank(seed, name), name))
    n, half = len(cycle), k // 2
    return {name: frozenset(cycle[(i + d) % n] for d in range(-half, half + 1) if d)
            for i, name in enumerate(cycle)}


def _rank(seed: bytes, name: str) -> bytes:
    return hmac.new(seed, name.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
