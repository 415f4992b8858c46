"""The messages of secure aggregation and their checks: the key advert, the
reveal, and the validation of what a peer or the server names (the roster,
client names, the neighbour graph, the threshold, the round context).

A KeyAdvert travels as advert_to_bytes (c_pk || s_pk, 64 bytes); a Reveal as
two maps from client name to shamir.share_to_bytes payloads (132 bytes).
Every check raises SecAggError naming what is wrong, never another error.

Pure: imports the standard library and paramserver's errors, secagg_crypto
and secagg_masks; no torch, grpc, threads or I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from paramserver.errors import SecAggError, listing, quote
from paramserver.secagg_crypto import KEY_SIZE, check_public_key, name_bytes
from paramserver.secagg_masks import Graph, full_graph

ADVERT_SIZE = 2 * KEY_SIZE


@dataclass(frozen=True)
class KeyAdvert:
    """A client's two public keys for one round, 32 raw bytes each: c_pk for
    the boxes of shares, s_pk for the pairwise masks."""

    c_pk: bytes
    s_pk: bytes

    def __post_init__(self) -> None:
        check_public_key(self.c_pk, "c_pk")
        check_public_key(self.s_pk, "s_pk")


def advert_to_bytes(advert: KeyAdvert) -> bytes:
    """c_pk || s_pk: ADVERT_SIZE bytes."""
    return advert.c_pk + advert.s_pk


def advert_from_bytes(data: bytes) -> KeyAdvert:
    """Raises SecAggError unless `data` is ADVERT_SIZE bytes."""
    if not isinstance(data, bytes) or len(data) != ADVERT_SIZE:
        raise SecAggError(f"a key advert is {ADVERT_SIZE} bytes")
    return KeyAdvert(data[:KEY_SIZE], data[KEY_SIZE:])


@dataclass(frozen=True)
class Reveal:
    """One client's answer in the unmasking stage: share_to_bytes payloads
    keyed by the client whose secret they are a share of: of b for included
    clients, of s_sk for dropped ones."""

    self_mask_shares: Mapping[str, bytes]
    key_shares: Mapping[str, bytes]


def check_roster(roster: Mapping[str, KeyAdvert]) -> dict[str, KeyAdvert]:
    """The roster as a dict, if its names are valid, its values KeyAdverts and
    all its public keys (both of every client) distinct; else SecAggError."""
    if not isinstance(roster, Mapping):
        raise SecAggError("the roster must map client names to key adverts")
    owners: dict[bytes, str] = {}
    for name in sorted_names(roster, "the roster"):
        advert = roster[name]
        if not isinstance(advert, KeyAdvert):
            raise SecAggError(f"the advert of client {quote(name)} is not a KeyAdvert")
        for key in (advert.c_pk, advert.s_pk):
            if key in owners:
                raise SecAggError(f"clients {quote(owners[key])} and {quote(name)} advertise "
                                  "the same public key")
            owners[key] = name
    return dict(roster)


def sorted_names(names: Collection[str], what: str) -> list[str]:
    """The names sorted, if each is a valid client name; else SecAggError
    naming `what` they are."""
    if isinstance(names, str | bytes):  # iterating it would give characters
        raise SecAggError(f"{what}: expected a collection of names, got {quote(names)}")
    for name in names:
        try:
            name_bytes(name)
        except SecAggError as e:
            raise SecAggError(f"{what}: {e}") from e
    return sorted(names)


def known_names(names: Collection[str], roster: Mapping[str, KeyAdvert]) -> frozenset[str]:
    """The names as a set, if all are in the roster; else SecAggError."""
    unknown = [name for name in sorted_names(names, "client names") if name not in roster]
    if unknown:
        raise SecAggError(f"clients {listing(unknown)} are not in the roster")
    return frozenset(names)


def neighbourhood(name: str, roster: Mapping[str, KeyAdvert],
                  neighbours: Collection[str] | None) -> frozenset[str]:
    """A client's neighbours without itself: everyone else without a graph."""
    if neighbours is None:
        return frozenset(roster) - {name}
    return known_names(neighbours, roster) - {name}


def check_graph(roster: Mapping[str, KeyAdvert],
                neighbours: Mapping[str, frozenset[str]] | None) -> Graph:
    """The graph restricted to the roster, without self loops; SecAggError if
    it names strangers or is not symmetric. None is the full graph."""
    if neighbours is None:
        return full_graph(roster)
    if not isinstance(neighbours, Mapping):
        raise SecAggError("the neighbour graph must map client names to sets of names")
    graph = {name: known_names(neighbours.get(name, ()), roster) - {name} for name in roster}
    for u in sorted(graph):
        lonely = sorted(v for v in graph[u] if u not in graph[v])
        if lonely:
            raise SecAggError(f"the neighbour graph is not symmetric: client {quote(u)} has "
                              f"{listing(lonely)} as neighbours, but not they it")
    return graph


def check_threshold(threshold: int, size: int) -> None:
    if type(threshold) is not int or not 1 <= threshold <= size:
        raise SecAggError(f"threshold {quote(threshold)} is outside 1..{size} (the size of "
                          "the neighbourhood, the client itself included)")


def check_context(context: bytes) -> None:
    if not isinstance(context, bytes):
        raise SecAggError("the round context must be bytes")


