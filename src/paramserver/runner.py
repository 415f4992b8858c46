"""A client's whole run, for any Task: register (with the model's specs), then
round after round fetch the global model, train, send, and re-sync after
crashes, aborted rounds, dropouts and barriers that timed out. With a server
that assigns rounds (sampling, evaluation, per-round settings) it asks
NextRound before each round: trains when drawn, waits for the round's model
when not, evaluates when asked.

Over a ParameterServerClient (gRPC); must not import grpc itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from paramserver import codec, errors, faults
from paramserver.client import ParameterServerClient, Registration
from paramserver.secagg_client import secure_train_and_send
from paramserver.task import Task

log = logging.getLogger("paramserver.client")

# Re-syncs in a row without an acknowledged update before the client gives up.
MAX_RESYNCS = 20
# When neither the client nor the server sets a number of rounds.
DEFAULT_ROUNDS = 5


@dataclass(frozen=True)
class RoundReport:
    """One round this client trained for: what it sent and what came back."""

    client: str
    round: int
    num_examples: int
    metrics: dict[str, float]
    received: int
    expected: int


@dataclass
class ClientSummary:
    """`rounds`: the digest of every global model this client's update was
    averaged into. `finished_before_joining`: the run was over when it came."""

    client: str
    rounds: dict[int, str] = field(default_factory=dict)
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    final: codec.ModelHeader | None = None
    finished_before_joining: bool = False
    total_rounds: int = 0  # the server's (0: no limit)


@dataclass
class _Run:
    client: ParameterServerClient
    task: Task
    name: str
    model: nn.Module
    rounds: int
    round_wait: float
    on_round: Callable[[RoundReport], None] | None
    summary: ClientSummary
    save_quantized: Path | None = None
    reg: Registration | None = None
    resyncs: int = 0
    _sent: set[int] = field(default_factory=set)  # rounds its update was acknowledged for

    def register(self) -> Registration:
        self.reg = self.client.register(self.name, codec.spec_of(self.model.state_dict()))
        return self.reg

    def fetch(self, round: int) -> codec.ModelHeader:
        assert self.reg is not None
        header, state = self.client.get_model(self.reg.client_id, round, self.round_wait)
        self.model.load_state_dict(state)
        if header.round in self._sent:
            self.summary.rounds[header.round] = header.sha256.hex()
        self.summary.final = header
        return header

    def train_and_send(self, round: int, config: dict[str, float]) -> None:
        assert self.reg is not None
        if self.reg.secagg is not None:
            self._secure_train_and_send(round, config)
            return
        result = self.task.train(self.model, round, self.name, config)
        faults.maybe_crash("client_before_upload", round)
        ack = self.client.send_update(self.reg.client_id, round, self.model.state_dict(),
                                      result.num_examples, dict(result.metrics))
        self._sent.add(round)
        self.resyncs = 0
        faults.maybe_crash("client_after_upload", round)
        if self.on_round is not None:
            self.on_round(RoundReport(self.name, round, result.num_examples,
                                      dict(result.metrics), ack.received, ack.expected))

    def _secure_train_and_send(self, round: int, config: dict[str, float]) -> None:
        """Keys first, then training, then the masked update and the unmasking."""
        assert self.reg is not None
        assert self.reg.secagg is not None

        def train() -> tuple[Mapping[str, torch.Tensor], int, dict[str, float]]:
            result = self.task.train(self.model, round, self.name, config)
            faults.maybe_crash("client_before_upload", round)
            return self.model.state_dict(), result.num_examples, dict(result.metrics)

        # No deadline on the stream: the server bounds each of its stages,
        # and keepalive notices a server that is gone.
        outcome, metrics, weight = secure_train_and_send(
            self.client, self.reg.client_id, round, self.reg.secagg, train, None,
            self.save_quantized)
        if outcome.included:
            self._sent.add(round)
        self.resyncs = 0
        if self.on_round is not None:
            self.on_round(RoundReport(self.name, round, weight, metrics, outcome.num_updates,
                                      outcome.num_updates))

    def evaluate(self, round: int) -> None:
        assert self.reg is not None
        result = self.task.evaluate(self.model)
        self.client.report_evaluation(self.reg.client_id, round, result.num_examples,
                                      result.metrics)
        self.summary.evaluations[round] = dict(result.metrics)

    def resync(self, error: errors.ParamServerError) -> Registration:
        self.resyncs += 1
        if self.resyncs > MAX_RESYNCS:
            raise error
        log.warning("%s: %s; re-syncing", self.name, error)
        return self.register()

    @property
    def last(self) -> int:
        assert self.reg is not None
        return self.rounds or self.reg.total_rounds or DEFAULT_ROUNDS


RESYNC_ON = (errors.RoundError, errors.RoundAbortedError, errors.UnknownClientError,
             errors.WaitTimeoutError, errors.ConflictingUpdateError, errors.SecAggError)


def run_client(client: ParameterServerClient, task: Task, name: str, *, rounds: int = 0,
               round_wait: float = 600.0, model: nn.Module | None = None,
               on_round: Callable[[RoundReport], None] | None = None,
               save_quantized: Path | None = None) -> ClientSummary:
    """Runs `name` through the server's rounds (up to round `rounds`; 0: all
    of them) with `task`. With secure aggregation, `save_quantized` keeps each
    round's quantised update (before masking) as DIR/NAME-round-R.npy. Raises
    ModelMismatchError if its model is not the server's, and what the client
    library raises once retries and re-syncs are used up."""
    run = _Run(client, task, name, model if model is not None else task.model(), rounds,
               round_wait, on_round, ClientSummary(name), save_quantized)
    reg = run.register()
    run.summary.total_rounds = reg.total_rounds
    if reg.run_finished:
        run.summary.finished_before_joining = True
        return run.summary
    if reg.assigns_rounds:
        _assigned(run)
    else:
        _in_turn(run)
    return run.summary


def _in_turn(run: _Run) -> None:
    """Every registered client takes part in every round: the round after the
    model it has."""
    assert run.reg is not None
    model_round, round = run.reg.model_round, run.reg.first_round
    while True:
        try:
            header = run.fetch(model_round)
            if header.round >= run.last or round > run.last:
                return
            run.train_and_send(round, dict(run.reg.config))
            model_round, round = round, round + 1
        except RESYNC_ON as error:
            reg = run.resync(error)
            model_round, round = reg.model_round, reg.first_round


def _assigned(run: _Run) -> None:
    """The server says what to do before each round (NextRound)."""
    assert run.reg is not None
    model_round = run.reg.model_round
    while True:
        try:
            header = run.fetch(model_round)
            if run.rounds and header.round >= run.rounds:
                return
            plan = run.client.next_round(run.reg.client_id, header.round, run.round_wait)
            if plan.evaluate_round:
                run.evaluate(plan.evaluate_round)
            if plan.role == "finished":
                if plan.model_round == header.round:
                    return
                model_round = plan.model_round  # fetch the final model, then ask again
                continue
            if plan.role == "train" and plan.model_round == header.round:
                run.train_and_send(plan.round, dict(plan.config))
            # Wait for the round (not drawn, or just sent), or fetch the model
            # to train on first; then ask again.
            model_round = plan.round if plan.role == "wait" or plan.model_round == header.round \
                else plan.model_round
        except RESYNC_ON as error:
            model_round = run.resync(error).model_round
