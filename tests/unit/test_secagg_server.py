"""The server's stages of secure aggregation (secagg_server.py), driven by
threads standing in for the clients' streams, with a fake clock for the
stage deadlines; and the secure-aggregation codec's round trips."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
from unit_fakes import FakeClock

from paramserver import secagg_codec
from paramserver.config import SecAggSettings
from paramserver.errors import CallEndedError, SecAggAbortedError, SecAggError
from paramserver.quantize import Quantization
from paramserver.secagg import SecAggClient, full_graph, neighbours, plain_sum
from paramserver.secagg_server import SecAggOrderError, SecureRounds, Stage
from paramserver.v1 import parameter_server_pb2 as pb

Q = Quantization(bits=32, frac_bits=8, clip=100.0)
COHORT = frozenset({"a", "b", "c", "d"})
LENGTH = 50
TIMEOUT = 30.0  # real seconds a test thread may take; the stages use the fake clock


def always() -> bool:
    return True


class Stream(threading.Thread):
    """One client's stream: runs `steps` against the server's stages."""

    def __init__(self, steps: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._steps = steps
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._steps()
        except BaseException as error:  # reported by outcome()
            self.error = error

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "a stream is still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {c: rng.integers(0, 2**32, LENGTH, dtype=np.uint64) for c in sorted(COHORT)}


def keys_stage(secure: SecureRounds, client: SecAggClient,
               ) -> tuple[SecAggClient, dict[str, bytes]]:
    secure.advertise(1, COHORT, client.name, client.advertise())
    roster = secure.roster(1, client.name, always)
    boxes = client.share_keys(roster.clients, roster.threshold, roster.graph[client.name],
                              roster.context)
    secure.share(1, client.name, boxes)
    return client, secure.delivered(1, client.name, always)


def unmask_stage(secure: SecureRounds, client: SecAggClient) -> tuple[int, int]:
    if client.name not in secure.survivors(1, client.name, always):
        return (0, 0)
    secure.confirm(1, client.name)
    included, dropped = secure.included(1, client.name, always)
    secure.reveal(1, client.name, client.reveal(included, dropped))
    return secure.done(1, client.name, always)


def keys_exchanged() -> tuple[SecureRounds, dict[str, SecAggClient], dict[str, dict[str, bytes]]]:
    """Round 1 of the whole cohort past the key exchange: the server's
    rounds, the clients, and the boxes each client was delivered."""
    secure = SecureRounds(SecAggSettings(Q, stage_timeout=60.0), FakeClock())
    clients = {c: SecAggClient(c, b"unused", Q) for c in sorted(COHORT)}
    streams = [Stream(partial(keys_stage, secure, c)) for c in clients.values()]
    for s in streams:
        s.start()
    delivered = {s.outcome()[0].name: s.outcome()[1] for s in streams}
    return secure, clients, delivered


def test_a_round_with_everyone_sums_exactly() -> None:
    secure, clients, delivered = keys_exchanged()
    assert secure.senders(1) == COHORT
    masked = {c: clients[c].mask(v, delivered[c]) for c, v in vectors().items()}
    finishing = [Stream(partial(unmask_stage, secure, c)) for c in clients.values()]
    for s in finishing:
        s.start()
    total = secure.unmask(1, masked, always)
    assert np.array_equal(total, plain_sum(list(vectors().values()), Q.bits))
    secure.finish(1, 4, 400)
    assert [s.outcome() for s in finishing] == [(4, 400)] * 4


def test_a_client_that_never_confirms_is_dropped_and_its_masks_removed() -> None:
    secure, clients, delivered = keys_exchanged()
    masked = {c: clients[c].mask(v, delivered[c]) for c, v in vectors().items()}
    # "d" sent its masked vector, then its stream ended before confirming.
    finishing = [Stream(partial(unmask_stage, secure, clients[c])) for c in "abc"]
    for s in finishing:
        s.start()
    secure.left(1, "d")
    total = secure.unmask(1, masked, always)
    expected = plain_sum([v for c, v in vectors().items() if c != "d"], Q.bits)
    assert np.array_equal(total, expected)
    secure.finish(1, 3, 300)
    assert [s.outcome() for s in finishing] == [(3, 300)] * 3


def test_a_silent_client_is_left_out_when_the_stage_times_out() -> None:
    clock = FakeClock()
    secure = SecureRounds(SecAggSettings(Q, stage_timeout=10.0), clock)
    clients = {c: SecAggClient(c, b"unused", Q) for c in "abc"}  # "d" never comes
    streams = [Stream(partial(keys_stage, secure, c)) for c in clients.values()]
    for s in streams:
        s.start()
    clock.wait_for_sleeper()
    assert all(s.is_alive() for s in streams)  # waiting for "d"
    clock.advance(10.0)
    for s in streams:
        s.outcome()
    assert secure.senders(1) == frozenset("abc")


def test_too_few_clients_abort_with_a_clear_message() -> None:
    clock = FakeClock()
    secure = SecureRounds(SecAggSettings(Q, threshold=3, stage_timeout=10.0), clock)
    a, b = SecAggClient("a", b"x", Q), SecAggClient("b", b"x", Q)
    streams = [Stream(partial(keys_stage, secure, c)) for c in (a, b)]
    for s in streams:
        s.start()
    clock.wait_for_sleeper()
    clock.advance(10.0)
    for s in streams:
        with pytest.raises(SecAggAbortedError, match="the threshold 3 is more than the 2"):
            s.outcome()


def test_messages_out_of_turn_are_refused_and_change_nothing() -> None:
    secure = SecureRounds(SecAggSettings(Q), FakeClock())
    a = SecAggClient("a", b"x", Q)
    with pytest.raises(SecAggOrderError, match="not in the cohort"):
        secure.advertise(1, COHORT, "zed", a.advertise())
    secure.advertise(1, COHORT, "a", a.advertise())
    with pytest.raises(SecAggOrderError, match="a second stream"):
        secure.advertise(1, COHORT, "a", a.advertise())
    with pytest.raises(SecAggError, match="another client's keys"):
        secure.advertise(1, COHORT, "b", a.advertise())
    with pytest.raises(SecAggOrderError, match="out of turn"):
        secure.share(1, "a", {})
    with pytest.raises(SecAggOrderError, match="no masked update expected"):
        secure.check_sender(1, "a")
    with pytest.raises(SecAggOrderError, match="out of turn"):
        secure.confirm(1, "a")


def test_a_stream_that_ends_frees_the_stage_and_its_own_wait() -> None:
    secure = SecureRounds(SecAggSettings(Q), FakeClock())
    a = SecAggClient("a", b"x", Q)
    secure.advertise(1, COHORT, "a", a.advertise())
    alive = threading.Event()
    alive.set()
    waiting = Stream(lambda: secure.roster(1, "a", alive.is_set))
    waiting.start()
    alive.clear()
    secure.wake()
    with pytest.raises(CallEndedError):
        waiting.outcome()


def test_stopping_the_server_aborts_every_waiting_stage() -> None:
    secure = SecureRounds(SecAggSettings(Q), FakeClock())
    a = SecAggClient("a", b"x", Q)
    secure.advertise(1, COHORT, "a", a.advertise())
    waiting = Stream(lambda: secure.roster(1, "a", always))
    waiting.start()
    secure.abort_all("the server is stopping")
    with pytest.raises(SecAggAbortedError, match="stopping"):
        waiting.outcome()


def test_a_new_round_aborts_what_is_left_of_the_last() -> None:
    secure = SecureRounds(SecAggSettings(Q), FakeClock())
    a = SecAggClient("a", b"x", Q)
    secure.advertise(1, COHORT, "a", a.advertise())
    secure.advertise(2, COHORT, "a", SecAggClient("a", b"x", Q).advertise())
    with pytest.raises(SecAggAbortedError, match="round 2 began"):
        secure.roster(1, "a", always)
    assert Stage.ADVERTISE.value == "advertise"


# -- the codec ---------------------------------------------------------------------


def test_codec_round_trips() -> None:
    clients = {c: SecAggClient(c, b"x", Q) for c in "abcd"}
    adverts = {c: k.advertise() for c, k in clients.items()}
    name, round, advert = secagg_codec.advert_from_proto(
        secagg_codec.advert_to_proto("a", 7, adverts["a"]))
    assert (name, round, advert) == ("a", 7, adverts["a"])
    for k in (0, 2):
        graph = neighbours(sorted(adverts), k, b"s" * 32) if k else full_graph(sorted(adverts))
        roster = secagg_codec.Roster(adverts, 3, b"ctx", b"s" * 32 if k else b"", graph)
        assert secagg_codec.roster_from_proto(secagg_codec.roster_to_proto(roster), k) == roster
    boxes = {"b": b"\x01" * 300}
    assert secagg_codec.boxes_from_proto(secagg_codec.boxes_to_proto(boxes).ciphertexts) == boxes
    both = (frozenset("ab"), frozenset("c"))
    assert secagg_codec.included_from_proto(secagg_codec.included_to_proto(*both)) == both
    names = frozenset("abc")
    assert secagg_codec.names_from_proto(secagg_codec.names_to_proto(names)) == names
    assert secagg_codec.settings_from_proto(secagg_codec.settings_to_proto(Q, 4)) == (Q, 4)


def test_codec_refuses_what_does_not_fit() -> None:
    with pytest.raises(SecAggError, match="is 2000 bytes"):
        secagg_codec.boxes_from_proto({"b": b"x" * 2000})
    with pytest.raises(SecAggError, match="invalid client name"):
        secagg_codec.boxes_from_proto({"no spaces": b""})
    with pytest.raises(SecAggError, match="not 132"):
        secagg_codec.reveal_from_proto(pb.SecAggReveal(key_shares={"a": b"short"}))
    with pytest.raises(SecAggError):
        secagg_codec.settings_from_proto(pb.SecAggSettings(bits=0))
    a = SecAggClient("a", b"x", Q).advertise()
    entry = pb.SecAggRosterEntry(client_id="a", c_public_key=a.c_pk, s_public_key=a.s_pk)
    with pytest.raises(SecAggError, match="threshold 0 for 1 clients"):
        secagg_codec.roster_from_proto(pb.SecAggRoster(clients=[entry], context=b"c"), 0)
    with pytest.raises(SecAggError, match="twice"):
        secagg_codec.roster_from_proto(pb.SecAggRoster(clients=[entry, entry], threshold=1,
                                                       context=b"c"), 0)
    with pytest.raises(SecAggError, match="graph seed"):
        secagg_codec.roster_from_proto(pb.SecAggRoster(clients=[entry], threshold=1,
                                                       context=b"c"), 4)
