"""The server's side of secure aggregation: where the clients' streams (the
SecureAggregation handler) and the aggregation thread meet, one SecureRound
per round. Owns the stages' bookkeeping, the waiting (a condition and the
injected clock) and the stage deadlines; the cryptography is secagg.py's, and
the masked vectors arrive as ordinary updates through the round machine's
barrier.

Stages of round r (the .proto tells the client's view):
  ADVERTISE  until every cohort member advertised keys or left, or the stage
             deadline: the roster U1 (fewer than t: abort)
  SHARE      until every roster member sent its boxes or left, or the
             deadline: the senders U2 (fewer than t: abort)
  MASK       the round machine collects the masked vectors of U2; when it
             closes the round, the aggregation thread posts the survivors U3
  CONFIRM    until every survivor confirmed or left, or the deadline: the
             included U4 (fewer than t: abort). The consistency step of
             Bonawitz et al.: a client that dies after sending its vector,
             before confirming, is dropped, whatever the timing
  REVEAL     until every included client revealed or left, or the deadline
             (fewer than t reveals: abort)
  UNMASK     the aggregation thread unmasks the sum and publishes the model
  DONE       the round's model is published

A client that leaves (its stream ends) never holds up a stage. Every stage but
MASK has `stage_timeout` (from the injected clock); MASK has the round's own
deadline. Must not import grpc: the handler passes `alive` callables.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from paramserver import codec
from paramserver.clock import Clock, SystemClock
from paramserver.config import SecAggSettings
from paramserver.errors import CallEndedError, SecAggAbortedError, SecAggError, listing, quote
from paramserver.quantize import dequantize
from paramserver.secagg import KeyAdvert, Reveal, Vector, full_graph, neighbours, threshold_for
from paramserver.secagg import unmask as unmask_sum
from paramserver.secagg_codec import Roster
from paramserver.specs import ModelSpec, TensorSpec
from paramserver.spool import SpooledUpdate, SpoolReader

log = logging.getLogger("paramserver.secagg")

Alive = Callable[[], bool]

MASKED_TENSOR = "secagg.masked"


def masked_spec(specs: ModelSpec) -> ModelSpec:
    """What a masked update looks like on the wire: one INT64 vector (the
    uint64 bits) of the model's elements plus one for the weight."""
    length = sum(spec.numel for spec in specs) + 1
    return (TensorSpec(MASKED_TENSOR, torch.int64, (length,)),)


def secure_average(secure: SecureRounds, round: int, updates: Sequence[SpooledUpdate],
                   specs: ModelSpec, alive: Alive) -> tuple[bytes, int, int]:
    """The global model of a secure round: the survivors' masked vectors
    (read from the spool), unmasked by `secure`, divided by their total
    weight. Returns (payload, updates averaged, total examples). Raises
    SecAggAbortedError."""
    length = masked_spec(specs)[0].shape[0]
    with SpoolReader(updates) as reader:
        masked = {u.header.client_id: reader.rows([u], 0, length, torch.int64)[0].numpy()
                  .view(np.uint64) for u in updates}
    total = secure.unmask(round, masked, alive)
    q = secure.settings.quantization
    try:
        model = dequantize(total, list(specs), q)
    except SecAggError as error:  # e.g. a total weight of 0: nothing to average
        secure.abort(round, str(error))
        raise SecAggAbortedError(round, str(error)) from None
    payload = b"".join(bytes(v) for v in codec.payload_views(model))
    weight = int(total[-1])
    return payload, secure.included_count(round), weight


class SecAggOrderError(SecAggError):
    """A secure-aggregation message out of order, or for a round or client it
    does not belong to (FAILED_PRECONDITION)."""


class Stage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    CONFIRM = "confirm"
    REVEAL = "reveal"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass
class SecureRound:
    round: int
    cohort: frozenset[str]
    context: bytes
    graph_seed: bytes
    stage: Stage = Stage.ADVERTISE
    stage_started: float = 0.0
    adverts: dict[str, KeyAdvert] = field(default_factory=dict)
    roster: Roster | None = None
    boxes: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> recipient
    senders: frozenset[str] = frozenset()  # U2
    survivors: frozenset[str] = frozenset()  # U3
    confirmed: set[str] = field(default_factory=set)
    included: frozenset[str] = frozenset()  # U4
    reveals: dict[str, Reveal] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    done: tuple[int, int] | None = None  # updates, total examples
    why_aborted: str | None = None


class SecureRounds:
    """The rounds' secure aggregation, for one server. Thread-safe."""

    def __init__(self, settings: SecAggSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._cond = threading.Condition()
        self._rounds: dict[int, SecureRound] = {}

    def wake(self) -> None:
        """A call ended: its waiter looks at `alive` again."""
        with self._cond:
            self._cond.notify_all()

    # -- the clients' streams ------------------------------------------------------

    def advertise(self, round: int, cohort: frozenset[str], client: str,
                  advert: KeyAdvert) -> None:
        """Raises SecAggOrderError unless `client` is in the open round's
        cohort and has not advertised yet in this round."""
        with self._cond:
            if client not in cohort:
                raise SecAggOrderError(f"client {quote(client)} is not in the cohort of round "
                                       f"{round}: ask NextRound")
            secure = self._round(round, cohort)
            if secure.stage is not Stage.ADVERTISE or client in secure.adverts:
                raise SecAggOrderError(f"round {round} is past advertising keys for "
                                       f"{quote(client)} (a second stream?)")
            if advert in secure.adverts.values():
                raise SecAggError(f"client {quote(client)} advertised another client's keys")
            secure.adverts[client] = advert
            self._cond.notify_all()

    def roster(self, round: int, client: str, alive: Alive) -> Roster:
        secure = self._wait(round, client, alive, lambda s: s.roster is not None)
        assert secure.roster is not None
        return secure.roster

    def share(self, round: int, client: str, boxes: Mapping[str, bytes]) -> None:
        with self._cond:
            secure = self._existing(round)
            roster = secure.roster
            if secure.stage is not Stage.SHARE or roster is None or client in secure.boxes:
                raise SecAggOrderError(f"client {quote(client)} sent its shares out of turn")
            if client not in roster.clients:
                raise SecAggOrderError(f"client {quote(client)} is not in the roster")
            if set(boxes) != set(roster.graph[client]):
                raise SecAggError(f"client {quote(client)} sent shares for "
                                  f"{listing(sorted(boxes))}, not for its neighbours")
            secure.boxes[client] = dict(boxes)
            self._cond.notify_all()

    def delivered(self, round: int, client: str, alive: Alive) -> dict[str, bytes]:
        secure = self._wait(round, client, alive, lambda s: s.stage is not Stage.SHARE)
        with self._cond:
            return {sender: secure.boxes[sender][client] for sender in sorted(secure.senders)
                    if client in secure.boxes[sender]}

    def senders(self, round: int) -> frozenset[str]:
        """U2: the clients that shared keys (empty before the stage closed)."""
        with self._cond:
            return self._existing(round).senders

    def check_sender(self, round: int, client: str) -> None:
        """A masked update may come only from U2 of its round, in MASK."""
        with self._cond:
            secure = self._rounds.get(round)
            if secure is None or secure.stage is not Stage.MASK or client not in secure.senders:
                raise SecAggOrderError(f"no masked update expected from {quote(client)} in "
                                       f"round {round}: it is not among the clients that "
                                       "shared keys, or the round is past that")

    def survivors(self, round: int, client: str, alive: Alive) -> frozenset[str]:
        secure = self._wait(round, client, alive,
                            lambda s: s.stage not in (Stage.SHARE, Stage.MASK))
        return secure.survivors

    def confirm(self, round: int, client: str) -> None:
        with self._cond:
            secure = self._existing(round)
            if secure.stage is not Stage.CONFIRM or client not in secure.survivors:
                raise SecAggOrderError(f"client {quote(client)} confirmed out of turn")
            secure.confirmed.add(client)
            self._cond.notify_all()

    def included(self, round: int, client: str, alive: Alive,
                 ) -> tuple[frozenset[str], frozenset[str]]:
        """(U4, U2 - U4): the clients summed and the ones dropped."""
        secure = self._wait(round, client, alive, lambda s: s.stage is not Stage.CONFIRM)
        return secure.included, secure.senders - secure.included

    def reveal(self, round: int, client: str, reveal: Reveal) -> None:
        with self._cond:
            secure = self._existing(round)
            if (secure.stage is not Stage.REVEAL or client not in secure.included
                    or client in secure.reveals):
                raise SecAggOrderError(f"client {quote(client)} revealed out of turn")
            secure.reveals[client] = reveal
            self._cond.notify_all()

    def done(self, round: int, client: str, alive: Alive) -> tuple[int, int]:
        secure = self._wait(round, client, alive, lambda s: s.done is not None)
        assert secure.done is not None
        return secure.done

    def left(self, round: int, client: str) -> None:
        """The client's stream ended: no stage waits for it any more."""
        with self._cond:
            secure = self._rounds.get(round)
            if secure is not None and secure.stage not in (Stage.DONE, Stage.ABORTED):
                secure.gone.add(client)
                self._cond.notify_all()

    # -- the aggregation thread -------------------------------------------------------

    def unmask(self, round: int, masked: Mapping[str, Vector], alive: Alive) -> Vector:
        """The sum of the included clients' vectors, from the round's
        survivors `masked` (client -> masked vector): posts the survivors,
        waits for confirmations and reveals, unmasks. Raises
        SecAggAbortedError (the round must be aborted)."""
        with self._cond:
            secure = self._existing(round)
            if secure.stage is not Stage.MASK:
                raise SecAggAbortedError(round, f"the round was {secure.stage.value}, not "
                                         "collecting masked updates")
            secure.survivors = frozenset(masked)
            self._enter(secure, Stage.CONFIRM)
        secure = self._wait(round, None, alive, lambda s: s.stage is not Stage.CONFIRM)
        secure = self._wait(round, None, alive, lambda s: s.stage is not Stage.REVEAL)
        roster = secure.roster
        assert roster is not None
        try:
            return unmask_sum({u: masked[u] for u in secure.included}, roster.clients,
                              secure.senders, secure.reveals, roster.threshold, roster.context,
                              self.settings.quantization, roster.graph)
        except SecAggError as error:
            self.abort(round, str(error))
            raise SecAggAbortedError(round, str(error)) from None

    def included_count(self, round: int) -> int:
        with self._cond:
            return len(self._existing(round).included)

    def finish(self, round: int, updates: int, total_examples: int) -> None:
        with self._cond:
            secure = self._existing(round)
            secure.done = (updates, total_examples)
            self._enter(secure, Stage.DONE)
            self._forget_before(round)

    def abort(self, round: int, why: str) -> None:
        with self._cond:
            secure = self._rounds.get(round)
            if secure is not None and secure.stage is not Stage.DONE:
                self._abort(secure, why)

    def abort_all(self, why: str) -> None:
        """The server stops: nobody waits for a stage any more."""
        with self._cond:
            for secure in self._rounds.values():
                if secure.stage not in (Stage.DONE, Stage.ABORTED):
                    self._abort(secure, why)

    # -- stages -------------------------------------------------------------------------

    def _round(self, round: int, cohort: frozenset[str]) -> SecureRound:
        secure = self._rounds.get(round)
        if secure is None:
            # A fresh context per attempt: keys and masks of a round that is
            # run again (after a restart) are never those of the first try.
            context = f"paramserver secagg round {round} ".encode() + os.urandom(16)
            secure = SecureRound(round, cohort, context, os.urandom(32),
                                 stage_started=self._clock.now())
            self._rounds[round] = secure
            for older in [r for r in self._rounds if r < round]:
                self.abort(older, f"round {round} began")
        return secure

    def _existing(self, round: int) -> SecureRound:
        secure = self._rounds.get(round)
        if secure is None:
            raise SecAggOrderError(f"round {round} has no secure aggregation under way")
        return secure

    def _wait(self, round: int, client: str | None, alive: Alive,
              ready: Callable[[SecureRound], bool]) -> SecureRound:
        """Under the condition, advancing stages whose deadline passed, until
        `ready`; raises SecAggAbortedError if the round aborts, CallEndedError
        if the caller is gone."""
        with self._cond:
            secure = self._existing(round)
            while True:
                now = self._clock.now()
                self._advance(secure, now)
                if secure.why_aborted is not None:
                    raise SecAggAbortedError(round, secure.why_aborted)
                if ready(secure):
                    return secure
                if not alive():
                    if client is not None:
                        secure.gone.add(client)
                        self._advance(secure, now)
                        self._cond.notify_all()
                    raise CallEndedError(round)
                self._clock.wait(self._cond, self._remaining(secure, now))

    def _remaining(self, secure: SecureRound, now: float) -> float | None:
        if secure.stage in (Stage.MASK, Stage.UNMASK, Stage.DONE, Stage.ABORTED):
            return None
        return secure.stage_started + self.settings.stage_timeout - now

    def _advance(self, secure: SecureRound, now: float) -> None:
        """Closes every stage that is complete or past its deadline."""
        while secure.stage in _CLOSERS:
            late = (now - secure.stage_started) >= self.settings.stage_timeout
            if not _CLOSERS[secure.stage](self, secure, late):
                return

    def _close_advertise(self, secure: SecureRound, late: bool) -> bool:
        present = {c for c in secure.adverts if c not in secure.gone}
        if not late and not _settled(secure.cohort, secure.adverts.keys(), secure.gone):
            return False
        names = sorted(present)
        if len(names) < 2:
            return self._abort(secure, f"{len(names)} of {len(secure.cohort)} clients "
                                       "advertised keys; secure aggregation needs 2 or more")
        k = self.settings.neighbours
        graph = neighbours(names, k, secure.graph_seed) if k else full_graph(names)
        hood = 1 + min(len(g) for g in graph.values())
        threshold = self.settings.threshold or threshold_for(hood)
        if threshold > hood:
            return self._abort(secure, f"the threshold {threshold} is more than the "
                                       f"{hood} clients of a neighbourhood")
        secure.roster = Roster({c: secure.adverts[c] for c in names}, threshold,
                               secure.context, secure.graph_seed if k else b"", graph)
        self._enter(secure, Stage.SHARE)
        return True

    def _close_share(self, secure: SecureRound, late: bool) -> bool:
        roster = secure.roster
        assert roster is not None
        if not late and not _settled(roster.clients, secure.boxes.keys(), secure.gone):
            return False
        secure.senders = frozenset(secure.boxes)
        if len(secure.senders) < roster.threshold:
            return self._abort(secure, f"{len(secure.senders)} of {len(roster.clients)} "
                                       f"clients shared keys, the threshold is {roster.threshold}")
        self._enter(secure, Stage.MASK)
        return False  # MASK ends when the round machine closes the round

    def _close_confirm(self, secure: SecureRound, late: bool) -> bool:
        roster = secure.roster
        assert roster is not None
        if not late and not _settled(secure.survivors, secure.confirmed, secure.gone):
            return False
        secure.included = frozenset(secure.confirmed)
        if len(secure.included) < roster.threshold:
            return self._abort(secure, f"{len(secure.included)} of {len(secure.survivors)} "
                                       "clients confirmed their masked updates, the threshold "
                                       f"is {roster.threshold}")
        dropped = secure.senders - secure.included
        if dropped:
            log.info("round %d: %d clients summed securely, %s dropped", secure.round,
                     len(secure.included), listing(sorted(dropped)))
        self._enter(secure, Stage.REVEAL)
        return True

    def _close_reveal(self, secure: SecureRound, late: bool) -> bool:
        roster = secure.roster
        assert roster is not None
        if not late and not _settled(secure.included, secure.reveals.keys(), secure.gone):
            return False
        if len(secure.reveals) < roster.threshold:
            return self._abort(secure, f"{len(secure.reveals)} of {len(secure.included)} "
                                       f"clients revealed shares, the threshold is "
                                       f"{roster.threshold}")
        self._enter(secure, Stage.UNMASK)  # the aggregation thread takes it from here
        return False

    def _enter(self, secure: SecureRound, stage: Stage) -> None:
        secure.stage = stage
        secure.stage_started = self._clock.now()
        self._cond.notify_all()

    def _abort(self, secure: SecureRound, why: str) -> bool:
        log.warning("secure aggregation of round %d aborted: %s", secure.round, why)
        secure.why_aborted = why
        secure.stage = Stage.ABORTED
        self._cond.notify_all()
        return False

    def _forget_before(self, round: int) -> None:
        for old in [r for r in self._rounds if r < round]:
            del self._rounds[old]


def _settled(expected: Iterable[str], arrived: Iterable[str], gone: set[str]) -> bool:
    """Everyone expected has either arrived or left."""
    done = set(arrived) | gone
    return all(name in done for name in expected)


_CLOSERS: dict[Stage, Callable[[SecureRounds, SecureRound, bool], bool]] = {
    Stage.ADVERTISE: SecureRounds._close_advertise,
    Stage.SHARE: SecureRounds._close_share,
    Stage.CONFIRM: SecureRounds._close_confirm,
    Stage.REVEAL: SecureRounds._close_reveal,
}
