"""One secure-aggregation round run in memory: the reference for how the
stages of secagg.py connect, which bytes go where, and when a client may drop
out. For tests and in-process simulation; a transport does the same over the
wire (the server routes box u->v from u's upload to v's inbox).

Pure: imports paramserver's secagg modules and quantize; no grpc, threads,
clocks or I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum

from paramserver.quantize import Quantization
from paramserver.secagg import Reveal, SecAggClient, unmask
from paramserver.secagg_masks import Vector
from paramserver.shamir import Rng


class Fate(Enum):
    """When a client drops out; a client without a fate stays to the end."""

    BEFORE_SHARE = "advertises its keys, then sends no boxes"  # in U1, not in U2
    BEFORE_MASK = "sends its boxes, then no masked vector"  # in U2, not in U3
    AFTER_MASK = "masks its update, but the vector arrives too late"  # in U2, not in U3
    BEFORE_REVEAL = "its vector is summed, but it sends no reveal"  # in U3, not in U4


def simulate_round(updates: Mapping[str, Vector], threshold: int, context: bytes,
                   q: Quantization, *, graph: Mapping[str, frozenset[str]] | None = None,
                   fates: Mapping[str, Fate] | None = None, rng: Rng = os.urandom) -> Vector:
    """The unmasked sum of the updates of the clients that stay until their
    vectors are summed (no fate, or BEFORE_REVEAL). Raises SecAggError where a
    client or the server would abort the round (too few survivors)."""
    fates = fates or {}
    clients = {name: SecAggClient(name, context, q, rng) for name in sorted(updates)}
    roster = {name: client.advertise() for name, client in clients.items()}
    outboxes = {name: client.share_keys(roster, threshold,
                                        None if graph is None else graph[name])
                for name, client in clients.items() if fates.get(name) is not Fate.BEFORE_SHARE}
    senders = frozenset(outboxes)
    masked: dict[str, Vector] = {}
    for name in sorted(senders):
        if fates.get(name) is Fate.BEFORE_MASK:
            continue
        inbox = {sender: boxes[name] for sender, boxes in outboxes.items() if name in boxes}
        vector = clients[name].mask(updates[name], inbox)
        if fates.get(name) is not Fate.AFTER_MASK:
            masked[name] = vector
    included = frozenset(masked)
    reveals: dict[str, Reveal] = {
        name: clients[name].reveal(included, senders - included)
        for name in sorted(included) if fates.get(name) is not Fate.BEFORE_REVEAL}
    return unmask(masked, roster, senders, reveals, threshold, context, q, graph)
