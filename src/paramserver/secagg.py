"""Secure aggregation (Bonawitz et al. 2017), optionally on the sparse SecAgg+
graph (Bell et al. 2020): the client's protocol object and the server's
unmasking. The server learns the sum of the surviving clients' vectors and
nothing else about any one of them.

One round, stage by stage (the transport moves the bytes; secagg_sim.py runs
the same flow in memory):

1. advertise: each client u sends KeyAdvert(c_pk, s_pk). The clients that did
   form the roster U1, which the server sends to all of them.
2. share_keys: u splits s_sk (its mask key) and b (its self-mask seed) into
   t-of-n Shamir shares, one per neighbour v (x = 1-based index of v in
   sorted(U1)), and returns a box per neighbour, encrypted under a key agreed
   from c_u and c_v. The clients whose boxes arrive form U2 (`senders`); the
   server hands each u the boxes addressed to it from U2.
3. mask: u masks its vector with its self mask PRG(b_u) and, for every
   neighbour v whose box it got, +PRG(s_uv) if u < v else -PRG(s_uv), where
   s_uv comes from s_u and s_v. The vectors that arrive define U3 (`included`).
4. reveal: every u in U3 gets (U3, U2 - U3). For an included peer it reveals
   its share of b; for a dropped one, its share of s_sk; never both for one
   peer in a round, which is what keeps a vector masked. unmask then removes
   the self masks of U3 and the pairwise masks between U3 and U2 - U3.

With a graph, shares and pairwise masks exist only between neighbours, and
the threshold applies within each neighbourhood (the client itself included).
Security is against an honest-but-curious server with at most t - 1 colluding
clients; adverts are not signed, so a server that invents clients is out of
scope (Bonawitz et al.'s signatures are not done). The consistency step that
fixes U3 after the vectors arrived (a client that dies after sending its
vector is dropped) is the transport's: secagg_server.py.
With exactly t shares a tampered share of b cannot be detected (the sum comes
out wrong); a tampered share of s_sk always is (its public key must match).

Pure: stdlib, numpy and paramserver's errors, shamir, secagg_crypto,
secagg_masks, secagg_messages and quantize (for Quantization). No grpc,
threads, sockets, clocks or files; secrets are never logged.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

from paramserver.errors import SecAggError, listing, quote
from paramserver.quantize import Quantization
from paramserver.secagg_crypto import (
    KEY_SIZE,
    LABEL_MASK,
    LABEL_SHARE,
    agree,
    draw,
    name_bytes,
    new_private_key,
    open_shares,
    private_key_from_bytes,
    public_bytes,
    seal_shares,
)
from paramserver.secagg_masks import (
    SEED_SIZE,
    Graph,
    Vector,
    check_vector,
    expand,
    full_graph,
    neighbours,
    pair_sign,
    plain_sum,
    reduce,
    threshold_for,
)
from paramserver.secagg_messages import (
    ADVERT_SIZE,
    KeyAdvert,
    Reveal,
    advert_from_bytes,
    advert_to_bytes,
    check_context,
    check_graph,
    check_roster,
    check_threshold,
    known_names,
    neighbourhood,
    sorted_names,
)
from paramserver.shamir import Rng, Share, combine, share_from_bytes, share_to_bytes, split

# The public API of secure aggregation in one place (the transport imports
# from here); the messages are defined in secagg_messages.py.
__all__ = ["ADVERT_SIZE", "KeyAdvert", "Reveal", "SecAggClient", "Vector", "advert_from_bytes",
           "advert_to_bytes", "check_roster", "full_graph", "neighbours", "plain_sum",
           "threshold_for", "unmask"]


class _Kind(Enum):
    SELF_MASK = "share of the self-mask seed"
    KEY = "share of the mask key"


@dataclass(frozen=True)
class _Sharing:
    """What share_keys fixed for the round."""

    roster: Mapping[str, KeyAdvert]
    threshold: int
    hood: frozenset[str]  # the neighbours, without the client itself
    index: Mapping[str, int]
    self_seed: bytes
    own: tuple[Share, Share]  # its own shares of its s_sk and b


class SecAggClient:
    """One client's side of one round; holds its secrets. Each stage runs
    once, in order; a refused call raises SecAggError and changes nothing."""

    def __init__(self, name: str, context: bytes, q: Quantization,
                 rng: Rng = os.urandom) -> None:
        name_bytes(name)
        check_context(context)
        self.name, self._context, self._bits, self._rng = name, context, q.bits, rng
        self._c_sk = new_private_key(rng)
        self._s_sk = new_private_key(rng)
        self._advert = KeyAdvert(public_bytes(self._c_sk), public_bytes(self._s_sk))
        self._sharing: _Sharing | None = None
        self._held: dict[str, tuple[Share, Share]] | None = None
        self._revealed: dict[str, _Kind] = {}

    def advertise(self) -> KeyAdvert:
        return self._advert

    def share_keys(self, roster: Mapping[str, KeyAdvert], threshold: int,
                   neighbours: frozenset[str] | None = None,
                   context: bytes | None = None) -> dict[str, bytes]:
        """The boxes of this client's shares, keyed by neighbour (everyone
        else in `roster` without a graph). `context`, if given, replaces the
        one of the constructor (the server sends it with the roster, after the
        keys were advertised). Raises SecAggError if the roster lacks this
        client's own advert or repeats a public key, if a neighbour is not in
        it, or if the threshold is outside 1..neighbourhood size."""
        if self._sharing is not None:
            raise SecAggError(f"client {quote(self.name)} has already shared its keys")
        if context is not None:
            check_context(context)
            self._context = context
        roster = check_roster(roster)
        if roster.get(self.name) != self._advert:
            raise SecAggError(f"the roster lacks client {quote(self.name)}'s own key advert")
        hood = neighbourhood(self.name, roster, neighbours)
        check_threshold(threshold, len(hood) + 1)
        index = {name: i + 1 for i, name in enumerate(sorted(roster))}
        self_seed = draw(self._rng, SEED_SIZE)
        holders = [index[v] for v in sorted(hood | {self.name})]
        keys = split(self._s_sk.private_bytes_raw(), threshold, holders, self._rng)
        seeds = split(self_seed, threshold, holders, self._rng)
        boxes = {}
        for v in sorted(hood):
            key = agree(self._c_sk, roster[v].c_pk, v, LABEL_SHARE, self._context)
            boxes[v] = seal_shares(key, self._context, self.name, v, keys[index[v]],
                                   seeds[index[v]], self._rng)
        me = index[self.name]
        self._sharing = _Sharing(roster, threshold, hood, index, self_seed, (keys[me], seeds[me]))
        return boxes

    def mask(self, update: Vector, delivered: Mapping[str, bytes]) -> Vector:
        """y = update + PRG(b) + sum of the pairwise masks with exactly the
        senders of `delivered` (the boxes addressed to this client, keyed by
        sender). Raises SecAggError for an update that is not a uint64 vector
        below 2**bits, a box from a non-neighbour or that does not open
        (naming the sender), or fewer than the threshold of senders."""
        sharing = self._stage("mask", shared=True, masked=False)
        check_vector(update, self._bits, f"the update of client {quote(self.name)}")
        held = {self.name: sharing.own}
        for sender in sorted_names(delivered, "senders"):
            held[sender] = self._open(sharing, sender, delivered[sender])
        if len(held) < sharing.threshold:
            raise SecAggError(f"{len(held)} clients of the neighbourhood of client "
                              f"{quote(self.name)} (itself included) sent shares, the threshold "
                              f"is {sharing.threshold}")
        masked = update.copy()
        np.add(masked, expand(sharing.self_seed, len(update), self._bits), out=masked)
        for v in sorted(held.keys() - {self.name}):
            seed = agree(self._s_sk, sharing.roster[v].s_pk, v, LABEL_MASK, self._context)
            _add_signed(masked, expand(seed, len(update), self._bits), pair_sign(self.name, v))
        self._held = held
        return reduce(masked, self._bits)

    def _open(self, sharing: _Sharing, sender: str, box: bytes) -> tuple[Share, Share]:
        if sender not in sharing.hood:
            raise SecAggError(f"client {quote(sender)} is not a neighbour of client "
                              f"{quote(self.name)} in this round: its box is refused")
        key = agree(self._c_sk, sharing.roster[sender].c_pk, sender, LABEL_SHARE, self._context)
        shares = open_shares(key, self._context, sender, self.name, box)
        if {share.x for share in shares} != {sharing.index[self.name]}:
            raise SecAggError(f"the shares from client {quote(sender)} are not for index "
                              f"{sharing.index[self.name]} (client {quote(self.name)})")
        return shares

    def reveal(self, included: Collection[str], dropped: Collection[str]) -> Reveal:
        """For each neighbour (or itself) in `included`: its share of their b;
        for each neighbour in `dropped`: its share of their s_sk. Names outside
        its neighbourhood are skipped. Raises SecAggError if the two sets
        overlap, this client is not included, a name is not in the roster or
        is a neighbour that sent no box, fewer than the threshold of its
        neighbourhood are included, or it revealed the other kind of share for
        one of them earlier in this round."""
        sharing = self._stage("reveal", shared=True, masked=True)
        inc, drop = known_names(included, sharing.roster), known_names(dropped, sharing.roster)
        if inc & drop:
            raise SecAggError(f"clients {listing(sorted(inc & drop))} are named both included "
                              "and dropped")
        if self.name not in inc:
            raise SecAggError(f"client {quote(self.name)} is not among the included clients")
        hood = sharing.hood | {self.name}
        inc, drop = inc & hood, drop & hood
        self._check_reveal(inc, drop, sharing.threshold)
        self._revealed.update(dict.fromkeys(inc, _Kind.SELF_MASK) | dict.fromkeys(drop, _Kind.KEY))
        return Reveal(self_mask_shares=self._payloads(inc, 1), key_shares=self._payloads(drop, 0))

    def _check_reveal(self, inc: frozenset[str], drop: frozenset[str], threshold: int) -> None:
        held = self._held or {}
        silent = sorted((inc | drop) - held.keys())
        if silent:
            raise SecAggError(f"clients {listing(silent)} sent no shares to client "
                              f"{quote(self.name)} in this round")
        if len(inc) < threshold:
            raise SecAggError(f"{len(inc)} clients of the neighbourhood of client "
                              f"{quote(self.name)} are included, the threshold is {threshold}")
        conflicts = sorted([v for v in inc if self._revealed.get(v) is _Kind.KEY]
                           + [v for v in drop if self._revealed.get(v) is _Kind.SELF_MASK])
        if conflicts:
            raise SecAggError(f"client {quote(self.name)} already revealed the other kind of "
                              f"share of {listing(conflicts)} this round; revealing both would "
                              "unmask their vectors")

    def _payloads(self, owners: frozenset[str], which: int) -> dict[str, bytes]:
        held = self._held or {}
        return {v: share_to_bytes(held[v][which]) for v in sorted(owners)}

    def _stage(self, stage: str, *, shared: bool, masked: bool) -> _Sharing:
        done = (self._sharing is not None, self._held is not None)
        if self._sharing is None or done != (shared, masked):
            order = "share_keys first" if self._sharing is None else "each stage once, in order"
            raise SecAggError(f"client {quote(self.name)} cannot {stage} now: call {order}")
        return self._sharing


def unmask(masked: Mapping[str, Vector], roster: Mapping[str, KeyAdvert],
           senders: Collection[str], reveals: Mapping[str, Reveal], threshold: int,
           context: bytes, q: Quantization,
           neighbours: Mapping[str, frozenset[str]] | None = None) -> Vector:
    """The sum mod 2**bits of the vectors behind `masked` (keyed by client:
    the included clients U3), from the roster U1, the clients U2 whose boxes
    were delivered (`senders`), and the reveals of included clients.

    Raises SecAggError for: an included client that is not a sender or a
    sender not in the roster, vectors of different lengths, fewer reveals than
    the threshold, a reveal from a client that is not included, a share for a
    client its sender may not hold, a malformed or misindexed share, too few
    shares for a neighbourhood, or shares that are inconsistent or rebuild a
    key that does not match its advert (tampering); each names the client."""
    roster = check_roster(roster)
    check_context(context)
    graph = check_graph(roster, neighbours)
    included, sent = known_names(masked, roster), known_names(senders, roster)
    if not included:
        raise SecAggError("no masked vectors to unmask")
    if not included <= sent:
        raise SecAggError(f"masked vectors from {listing(sorted(included - sent))}, which "
                          "sent no shares")
    check_threshold(threshold, len(roster))
    strangers = sorted(known_names(reveals, roster) - included)
    if strangers:
        raise SecAggError(f"reveals from {listing(strangers)}, which are not included")
    if len(reveals) < threshold:
        raise SecAggError(f"{len(reveals)} of {len(included)} clients revealed, the threshold "
                          f"is {threshold}")
    length = _check_masked(masked, q.bits)
    seeds, keys = _collect(reveals, roster, graph, included, sent - included)
    total = plain_sum([masked[u] for u in sorted(included)])
    for u in sorted(included):
        seed = _combine(seeds[u], threshold, f"the self-mask seed of client {quote(u)}")
        np.subtract(total, expand(seed, length, q.bits), out=total)
    for v in sorted(sent - included):
        partners = sorted(graph[v] & included)
        if partners:
            _remove_pairs(total, _recover_key(keys[v], threshold, v, roster[v]), v, partners,
                          roster, context, q.bits)
    return reduce(total, q.bits)


def _remove_pairs(total: Vector, key: bytes, dropped: str, partners: list[str],
                  roster: Mapping[str, KeyAdvert], context: bytes, bits: int) -> None:
    own = private_key_from_bytes(key)
    for u in partners:
        seed = agree(own, roster[u].s_pk, u, LABEL_MASK, context)
        # u added sign(u, v) * PRG(s_uv) to its vector: take that away.
        _add_signed(total, expand(seed, len(total), bits), -pair_sign(u, dropped))


def _recover_key(shares: list[Share], threshold: int, client: str, advert: KeyAdvert) -> bytes:
    key = _combine(shares, threshold, f"the mask key of dropped client {quote(client)}")
    if public_bytes(private_key_from_bytes(key)) != advert.s_pk:
        raise SecAggError(f"the mask key of dropped client {quote(client)} rebuilt from its "
                          "shares does not match its advert: a share was tampered with")
    return key


def _combine(shares: list[Share], threshold: int, what: str) -> bytes:
    try:
        return combine(shares, threshold, KEY_SIZE)
    except SecAggError as e:
        raise SecAggError(f"{what}: {e}") from e


def _collect(reveals: Mapping[str, Reveal], roster: Mapping[str, KeyAdvert], graph: Graph,
             included: frozenset[str], dropped: frozenset[str]
             ) -> tuple[dict[str, list[Share]], dict[str, list[Share]]]:
    """The revealed shares by owner: of b for included clients, of s_sk for
    dropped ones, each checked to be at its revealer's index and for a client
    the revealer holds a share of."""
    index = {name: i + 1 for i, name in enumerate(sorted(roster))}
    seeds: dict[str, list[Share]] = {u: [] for u in included}
    keys: dict[str, list[Share]] = {v: [] for v in dropped}
    for r in sorted(reveals):
        reveal = reveals[r]
        if not isinstance(reveal, Reveal):
            raise SecAggError(f"the reveal of client {quote(r)} is not a Reveal")
        _gather(reveal.self_mask_shares, included & (graph[r] | {r}), r, index[r],
                _Kind.SELF_MASK, seeds)
        _gather(reveal.key_shares, dropped & graph[r], r, index[r], _Kind.KEY, keys)
    return seeds, keys


def _gather(payloads: Mapping[str, bytes], allowed: frozenset[str], revealer: str, x: int,
            kind: _Kind, into: dict[str, list[Share]]) -> None:
    if not isinstance(payloads, Mapping):
        raise SecAggError(f"the reveal of client {quote(revealer)} is malformed")
    for owner, payload in payloads.items():
        what = f"client {quote(revealer)}'s {kind.value} of client {quote(owner)}"
        if owner not in allowed:
            raise SecAggError(f"{what}: it holds no such share, or must not reveal it")
        try:
            share = share_from_bytes(payload)
        except SecAggError as e:
            raise SecAggError(f"{what}: {e}") from e
        if share.x != x:
            raise SecAggError(f"{what}: index x={quote(share.x)}, its index is {x}")
        into[owner].append(share)


def _check_masked(masked: Mapping[str, Vector], bits: int) -> int:
    length: int | None = None
    for u in sorted(masked):
        vector = check_vector(masked[u], bits, f"the masked vector of client {quote(u)}", length)
        length = len(vector)
    return length or 0


def _add_signed(total: Vector, term: Vector, sign: int) -> None:
    if sign > 0:
        np.add(total, term, out=total)
    else:
        np.subtract(total, term, out=total)
