"""Secure aggregation's messages <-> protobuf: symmetric `*_to_proto` /
`*_from_proto` pairs, like codec.py's. Every `*_from_proto` checks what a
peer sent (sizes, names, counts) and raises SecAggError naming what does not
fit; nothing else escapes. Never imports grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from paramserver.errors import InvalidClientNameError, SecAggError, quote
from paramserver.quantize import Quantization
from paramserver.rounds import check_name
from paramserver.secagg import KeyAdvert, Reveal, full_graph, neighbours
from paramserver.shamir import SHARE_SIZE
from paramserver.v1 import parameter_server_pb2 as pb

# A box carries two shares, two names and framing: far below this.
MAX_BOX = 1024
MAX_CONTEXT = 256
MAX_CLIENTS = 100_000


@dataclass(frozen=True)
class Roster:
    """A secure round's clients (U1) with their keys, the threshold, the
    context bound into every derivation, and the SecAgg+ graph (its seed is
    empty for the full graph)."""

    clients: Mapping[str, KeyAdvert]
    threshold: int
    context: bytes
    graph_seed: bytes
    graph: Mapping[str, frozenset[str]]


def advert_to_proto(client_id: str, round: int, advert: KeyAdvert) -> pb.SecAggAdvertise:
    return pb.SecAggAdvertise(client_id=client_id, round=round, c_public_key=advert.c_pk,
                              s_public_key=advert.s_pk)


def advert_from_proto(message: pb.SecAggAdvertise) -> tuple[str, int, KeyAdvert]:
    return message.client_id, message.round, KeyAdvert(message.c_public_key,
                                                         message.s_public_key)


def roster_to_proto(roster: Roster) -> pb.SecAggRoster:
    return pb.SecAggRoster(
        clients=[pb.SecAggRosterEntry(client_id=name, c_public_key=a.c_pk, s_public_key=a.s_pk)
                 for name, a in sorted(roster.clients.items())],
        threshold=roster.threshold, context=roster.context, graph_seed=roster.graph_seed)


def roster_from_proto(message: pb.SecAggRoster, neighbours_k: int) -> Roster:
    """The roster, with the graph every client computes alike: SecAgg+ with
    degree `neighbours_k` from the graph seed, else the full graph."""
    if len(message.clients) > MAX_CLIENTS:
        raise SecAggError(f"a roster of {len(message.clients)} clients")
    clients = {}
    for entry in message.clients:
        _check_name(entry.client_id)
        if entry.client_id in clients:
            raise SecAggError(f"client {quote(entry.client_id)} twice in the roster")
        clients[entry.client_id] = KeyAdvert(entry.c_public_key, entry.s_public_key)
    if not 1 <= message.threshold <= len(clients):
        raise SecAggError(f"threshold {message.threshold} for {len(clients)} clients")
    if not 0 < len(message.context) <= MAX_CONTEXT:
        raise SecAggError(f"a context of {len(message.context)} bytes")
    if bool(message.graph_seed) != bool(neighbours_k) or len(message.graph_seed) > MAX_CONTEXT:
        raise SecAggError("the roster's graph seed does not match the SecAgg+ setting")
    graph = (neighbours(sorted(clients), neighbours_k, message.graph_seed) if neighbours_k
             else full_graph(sorted(clients)))
    return Roster(clients, message.threshold, message.context, message.graph_seed, graph)


def boxes_to_proto(boxes: Mapping[str, bytes]) -> pb.SecAggShares:
    return pb.SecAggShares(ciphertexts=dict(boxes))


def boxes_from_proto(boxes: Mapping[str, bytes]) -> dict[str, bytes]:
    """The boxes of SecAggShares or SecAggDelivered, checked for names and sizes."""
    if len(boxes) > MAX_CLIENTS:
        raise SecAggError(f"{len(boxes)} boxes")
    for name, box in boxes.items():
        _check_name(name)
        if len(box) > MAX_BOX:
            raise SecAggError(f"the box for {quote(name)} is {len(box)} bytes, at most "
                              f"{MAX_BOX}")
    return dict(boxes)


def included_to_proto(included: frozenset[str], dropped: frozenset[str]) -> pb.SecAggIncluded:
    return pb.SecAggIncluded(included=sorted(included), dropped=sorted(dropped))


def included_from_proto(message: pb.SecAggIncluded) -> tuple[frozenset[str], frozenset[str]]:
    return _names(message.included), _names(message.dropped)


def reveal_to_proto(reveal: Reveal) -> pb.SecAggReveal:
    return pb.SecAggReveal(self_mask_shares=dict(reveal.self_mask_shares),
                           key_shares=dict(reveal.key_shares))


def reveal_from_proto(message: pb.SecAggReveal) -> Reveal:
    for shares in (message.self_mask_shares, message.key_shares):
        if len(shares) > MAX_CLIENTS:
            raise SecAggError(f"a reveal of {len(shares)} shares")
        for name, share in shares.items():
            _check_name(name)
            if len(share) != SHARE_SIZE:
                raise SecAggError(f"the share of {quote(name)}'s secret is {len(share)} bytes, "
                                  f"not {SHARE_SIZE}")
    return Reveal(dict(message.self_mask_shares), dict(message.key_shares))


def settings_to_proto(q: Quantization, neighbours: int) -> pb.SecAggSettings:
    return pb.SecAggSettings(bits=q.bits, frac_bits=q.frac_bits, clip=q.clip,
                             neighbours=neighbours)


def settings_from_proto(message: pb.SecAggSettings) -> tuple[Quantization, int]:
    """Raises SecAggError for a quantisation that cannot be."""
    return Quantization(message.bits, message.frac_bits, message.clip), message.neighbours


def names_to_proto(names: frozenset[str]) -> pb.SecAggNames:
    return pb.SecAggNames(client_ids=sorted(names))


def names_from_proto(message: pb.SecAggNames) -> frozenset[str]:
    return _names(message.client_ids)


def _names(names: object) -> frozenset[str]:
    listed = list(names)  # type: ignore[call-overload]
    if len(listed) > MAX_CLIENTS:
        raise SecAggError(f"a list of {len(listed)} clients")
    for name in listed:
        _check_name(name)
    return frozenset(listed)


def _check_name(name: str) -> None:
    try:
        check_name(name)
    except InvalidClientNameError as error:
        raise SecAggError(str(error)) from None
