"""A client's side of one secure round, over a ParameterServerClient: the
SecureAggregation stream (keys, shares, confirmation, reveal) around the
masked update, which goes as an ordinary SendUpdate. The protocol object and
its secrets are secagg.SecAggClient's; one per round, never rebuilt (its
refusal to reveal both kinds of share for a client lives in it).

Keys are exchanged before training, so the stages that wait for everyone are
over by the time clients train; the masked update then meets the round's
usual barrier and deadline. Must not import grpc (client.py does the calls).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from paramserver import errors, faults, secagg_codec
from paramserver.client import Ack, ParameterServerClient
from paramserver.quantize import Quantization, quantize
from paramserver.secagg import SecAggClient
from paramserver.secagg_server import MASKED_TENSOR
from paramserver.v1 import parameter_server_pb2 as pb

log = logging.getLogger("paramserver.client")

# Trains for the round: the state_dict to send, its weight, its metrics.
TrainStep = Callable[[], tuple[Mapping[str, torch.Tensor], int, dict[str, float]]]
Vector = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class SecureOutcome:
    ack: Ack
    included: bool  # the client's update is in the round's sum
    num_updates: int  # averaged into the round's model (0 if not known)


class SecureRound:
    """Use as a context manager: `exchange_keys()`, train, `send(...)`,
    `finish()`. Every failure of the stream raises SecAggError (the round
    aborted, a peer's bad bytes, the connection lost): the round is lost for
    this client; ask NextRound again."""

    def __init__(self, client: ParameterServerClient, client_id: str, round: int,
                 settings: tuple[Quantization, int], timeout: float | None) -> None:
        self._client, self._id, self._round = client, client_id, round
        self._q, self._k = settings
        self._outbox: queue.Queue[pb.SecAggClientMessage | None] = queue.Queue()
        self._protocol = SecAggClient(client_id, b"pending: the roster brings the context",
                                      self._q)
        self._responses = client.secure_aggregation(self._requests(), timeout)
        self._delivered: dict[str, bytes] = {}
        self._roster_size = 0

    def __enter__(self) -> SecureRound:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._outbox.put(None)
        self._responses.cancel()

    def exchange_keys(self) -> None:
        """Advertise the round's public keys, share the secrets, receive the
        others' shares."""
        advert = self._protocol.advertise()
        self._put(pb.SecAggClientMessage(advertise=secagg_codec.advert_to_proto(
            self._id, self._round, advert)))
        roster = secagg_codec.roster_from_proto(self._next("roster").roster, self._k)
        self._roster_size = len(roster.clients)
        boxes = self._protocol.share_keys(roster.clients, roster.threshold,
                                          roster.graph.get(self._id), roster.context)
        self._put(pb.SecAggClientMessage(shares=secagg_codec.boxes_to_proto(boxes)))
        self._delivered = secagg_codec.boxes_from_proto(
            self._next("delivered").delivered.ciphertexts)

    def quantized(self, state_dict: Mapping[str, torch.Tensor], weight: int) -> Vector:
        """The update as the sum sees it: fixed point, times its weight, then
        the weight itself (a uint64 vector)."""
        return quantize(state_dict, list(state_dict), weight, self._q, self._roster_size)

    def send(self, vector: Vector) -> Ack:
        """Masks the quantised vector and sends it as this round's update
        (num_examples 1 and no metrics: the weight travels masked)."""
        masked = self._protocol.mask(vector, self._delivered)
        tensor = torch.from_numpy(masked.view(np.int64))
        return self._client.send_update(self._id, self._round, {MASKED_TENSOR: tensor}, 1)

    def finish(self) -> tuple[bool, int]:
        """Confirm, reveal, wait until the sum is unmasked: (whether this
        client's update is in it, how many updates are)."""
        survivors = secagg_codec.names_from_proto(self._next("survivors").survivors)
        if self._id not in survivors:
            return False, len(survivors)
        self._put(pb.SecAggClientMessage(confirm=pb.SecAggConfirm()))
        included, dropped = secagg_codec.included_from_proto(self._next("included").included)
        reveal = self._protocol.reveal(included, dropped)
        self._put(pb.SecAggClientMessage(reveal=secagg_codec.reveal_to_proto(reveal)))
        done = self._next("done").done
        return True, done.num_updates

    def _requests(self) -> Iterator[pb.SecAggClientMessage]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _put(self, message: pb.SecAggClientMessage) -> None:
        self._outbox.put(message)

    def _next(self, step: str) -> pb.SecAggServerMessage:
        try:
            message = self._responses.next()
        except errors.SecAggError:
            raise
        except errors.ParamServerError as error:
            raise errors.SecAggAbortedError(self._round, f"the stream failed: {error}") from None
        if message is None or message.WhichOneof("step") != step:
            got = "the end of the stream" if message is None else message.WhichOneof("step")
            raise errors.SecAggAbortedError(self._round, f"{got} where {step} was due")
        return message


def secure_train_and_send(client: ParameterServerClient, client_id: str, round: int,
                          settings: tuple[Quantization, int], train: TrainStep,
                          timeout: float | None, save_to: Path | None = None,
                          ) -> tuple[SecureOutcome, dict[str, float], int]:
    """One secure round: keys, training (`train()` returns the state_dict
    to send, its weight and metrics), the masked update, the unmasking.
    Returns the outcome, the training metrics and the weight."""
    with SecureRound(client, client_id, round, settings, timeout) as secure:
        secure.exchange_keys()
        state, weight, metrics = train()
        vector = secure.quantized(state, weight)
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            np.save(save_to / f"{client_id}-round-{round}.npy", vector, allow_pickle=False)
        ack = secure.send(vector)
        _after_masked_update(round)
        included, num_updates = secure.finish()
    return SecureOutcome(ack, included, num_updates), metrics, weight


def _after_masked_update(round: int) -> None:
    # A chaos test's client dies right after its masked update was acknowledged.
    faults.maybe_crash("client_after_masked", round)
