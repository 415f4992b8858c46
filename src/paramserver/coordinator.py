"""The server's engine: the one lock around the round machine, the waiting,
the timer (round deadlines, the end of a run), aggregation, and durability.
No grpc: server.py adapts it to RPCs, so everything here can be driven directly
by tests, with a fake clock (clock.py) for the timer.

Locking: `_cond` guards the round machine and the published global model. It
is never held while a payload crosses the network or the disk (receiving and
fsyncing an update, aggregating, writing the model), only while the machine
decides, an update file is renamed into place, and small state files change.
Waiters at the barrier sleep on the condition (no polling) and are woken when a
model is published, a round is aborted, or the server shuts down.

Durability (ordering is the point; the resume files are journal.py's):
  ack an update      after its file is fsynced, renamed into its round dir
                     (under the lock, only if the call is still alive) and the
                     dir fsynced (outside it)
  deadline           write closed.json (who the round closes with) or the abort
                     marker, then let the machine close or abort the round
  publish            write the model (keeping the previous), then open the next
                     round (cohort.json), then drop the old round's files
A restart reads this back (`_resume`) and continues the same round with every
update it had acknowledged; the result is bit-identical to a run without the
crash because the average depends only on the set of updates.

Storage: a state dir that cannot be written (full, read-only) never loses an
acknowledged update and never stops the server: the call that needed the write
gets StorageError (UNAVAILABLE: retry), `on_storage(False)` tells the transport
(health NOT_SERVING), and the write of a global model or a deadline record is
retried until it succeeds; the first write that succeeds again says
`on_storage(True)`. Errors reading the updates back while aggregating are a
bug or a broken disk: the server stops (fail-stop) and a restart redoes it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from paramserver import codec, faults
from paramserver.aggregation import Driver, initial_state, state_specs
from paramserver.averaging import average_metrics, validate_state_dict, weight_fractions
from paramserver.clock import MAX_WAIT, Clock, SystemClock
from paramserver.config import ServerConfig
from paramserver.errors import (
    CallEndedError,
    CapacityError,
    DecodeError,
    MalformedUpdateError,
    ModelMismatchError,
    SecAggAbortedError,
    ShuttingDownError,
    StorageError,
)
from paramserver.evaluation import Evaluations
from paramserver.journal import Journal
from paramserver.roundlog import RoundLog
from paramserver.rounds import (
    Aborted,
    Accepted,
    Assignment,
    ModelStatus,
    Phase,
    Registration,
    Role,
    RoundMachine,
    Update,
)
from paramserver.runend import RunEnd
from paramserver.sampling import Sampling
from paramserver.secagg_server import SecAggOrderError, SecureRounds, masked_spec, secure_average
from paramserver.spool import Spool, SpooledUpdate, SpoolReader, SpoolWriter
from paramserver.state import StateDir, StateDirError, StorageHealth

__all__ = ["Coordinator", "GlobalModel", "ServerConfig"]  # ServerConfig: config.py

log = logging.getLogger("paramserver.server")

# Backoff between attempts to write what a full disk refused (seconds of the clock).
STORAGE_RETRY_INITIAL, STORAGE_RETRY_MAX = 0.2, 5.0



@dataclass(frozen=True)
class GlobalModel:
    """A published global model: immutable, so it is served without the lock."""

    header: codec.ModelHeader
    payload: bytes | bytearray


class Coordinator:
    """Runs the rounds of one server. See the module docstring."""

    def __init__(self, config: ServerConfig, initial_model: Mapping[str, torch.Tensor],
                 clock: Clock | None = None) -> None:
        if config.state_dir is None:
            raise ValueError("a state directory is needed")
        self._config = config
        self._clock: Clock = clock or SystemClock()
        self._cond = threading.Condition()
        if config.clients < config.strategy.min_updates:
            raise ValueError(f"{config.strategy.name} needs at least "
                             f"{config.strategy.min_updates} updates a round: raise clients")
        # No round may close (or open) with fewer updates than the strategy
        # can combine: the quorum is at least that.
        quorum = max(config.min_clients, config.strategy.min_updates)
        if config.secagg is not None:
            quorum = max(quorum, 2)  # one client's "sum" would be its update
        self._machine: RoundMachine[SpooledUpdate] = RoundMachine(
            clients=config.clients, total_rounds=config.total_rounds,
            capacity=config.capacity, round_timeout=config.round_timeout,
            min_clients=quorum, min_available=max(config.min_available, quorum)
            if config.min_available else 0,
            sample=config.sampling.cohort if config.sampling else None)
        self._evaluations = Evaluations(config.evaluate_every,
                                        config.evaluation_sampling or Sampling())
        self.specs = codec.spec_of(initial_model)
        # With secure aggregation the updates are masked vectors, not models.
        self.secure = (SecureRounds(config.secagg, self._clock)
                       if config.secagg is not None else None)
        self.update_specs = masked_spec(self.specs) if self.secure is not None else self.specs
        self._strategy = config.strategy
        self._state_specs = state_specs(self.specs, config.strategy.optimizer)
        validate_state_dict(initial_model, self.specs)
        payload = b"".join(codec.payload_views(initial_model))
        self._model = GlobalModel(
            codec.ModelHeader(0, self.specs, hashlib.sha256(payload).digest()), payload)
        self._waiters = 0
        self._stopping = False
        self._persisted_round = 0
        self._adopt_next_round = False
        self._workers: list[threading.Thread] = []
        self._end = RunEnd(config.linger)
        self._round_log = RoundLog(config.round_log, config.on_record)
        self._server_state = bytearray()  # the optimizer's, after the published round
        self._state = StateDir(config.state_dir, durable=config.durable)
        self._storage = StorageHealth(config.state_dir, config.on_storage)
        try:
            if config.fresh:
                self._state.clear()
            self._spool = Spool(config.state_dir / "updates", durable=config.durable)
            self._journal = Journal(self._state, self._spool)
            self._resume()
        except OSError as error:
            self._state.close()
            raise StateDirError(f"cannot use {config.state_dir} as the state dir: "
                                f"{error.strerror or error}") from error
        except BaseException:
            self._state.close()
            raise
        self._timer = threading.Thread(target=self._timer_loop, name="timer", daemon=True)
        self._timer.start()

    # -- called by the transport ------------------------------------------------

    def register(self, name: str, specs: codec.ModelSpec | None = None) -> Registration:
        """Registers (or re-registers) a client. With `specs` (the client's
        model), raises ModelMismatchError, before anything changes, unless they
        are the server's. Also raises what RoundMachine.register raises, and
        StorageError if the client registry cannot be written."""
        self._check_running()
        if specs is not None:
            self._check_model(specs)
        with self._cond:
            machine = self._machine
            if machine.check_register(name):  # new: on disk before it counts
                registry = {**machine.registered, name: machine.open_round}
                self._write("the client registry", self._state.save_clients, registry)
            deadline = machine.deadline
            reg = machine.register(name, self._clock.now())
            if reg.is_new:
                log.info("client %s registered, first round %d", name, reg.first_round)
            self._persist_round_opened()
            if machine.deadline != deadline:
                self._cond.notify_all()  # the timer sleeps until the old one
            return reg

    def check_submit(self, header: codec.UpdateHeader) -> Accepted[SpooledUpdate] | None:
        """Raises what the update would be refused for; returns the ack of a duplicate."""
        self._check_running()
        with self._cond:
            duplicate = self._machine.check_submit(header.client_id, header.round, header.sha256)
        if duplicate is None:
            codec.check_specs_match(header.specs, self.update_specs)
            if self.secure is not None:
                self.secure.check_sender(header.round, header.client_id)
        else:  # the original may still be between its rename and its dir fsync
            self._sync_round(header.round)
        return duplicate

    def submit(self, header: codec.UpdateHeader, chunks: Iterable[codec.Buffer],
               alive: Callable[[], bool] | None = None) -> Accepted[SpooledUpdate]:
        """An update from the transport: refused (raises), acknowledged as a
        duplicate without reading `chunks` (a lazy stream stays unread), or
        received."""
        duplicate = self.check_submit(header)
        return duplicate if duplicate is not None else self.receive(header, chunks, alive)

    def receive(self, header: codec.UpdateHeader, chunks: Iterable[codec.Buffer],
                alive: Callable[[], bool] | None = None) -> Accepted[SpooledUpdate]:
        """Streams an update to disk, checking it as it arrives, then counts it
        if `alive()` (the call has not ended) still holds at the commit.
        Raises MalformedUpdateError/DecodeError, CallEndedError, StorageError or
        what `check_submit` raises; then nothing is counted and nothing is left
        on disk."""
        checker = codec.PayloadChecker(header.specs, header.sha256)
        try:
            writer = self._spool.writer(header)
        except OSError as error:
            raise self._storage_error(f"an update for round {header.round}", error) from error
        try:
            for chunk in chunks:
                checker.feed(chunk)
                writer.write(chunk)
            checker.finish()
            writer.seal()  # the fsync, outside the lock
            accepted, fastest = self._commit(header, writer, alive)
            # The rename's fsync, outside the lock (under it, every upload of a
            # round queued behind the others' fsyncs). For a duplicate it is
            # the original's, which may still be on its way to disk in another
            # call. If it fails the update is counted but not acknowledged: the
            # client's retry of the identical update is (StorageError says so).
            self._spool.sync_round(header.round)
        except OSError as error:
            raise self._storage_error(f"an update for round {header.round}", error) from error
        finally:
            writer.discard()  # no-op after commit
        if fastest is not None:
            self._record_fastest(header.round, fastest)
        self._storage.recovered()
        faults.maybe_crash("before_ack", header.round)
        faults.crash_at_next_call("after_ack", header.round)
        return accepted

    def _commit(self, header: codec.UpdateHeader, writer: SpoolWriter,
                alive: Callable[[], bool] | None,
                ) -> tuple[Accepted[SpooledUpdate], float | None]:
        """Counts the update (under the lock); also returns the round's new
        fastest time if this update set it."""
        with self._cond:  # re-decide: the round may have moved on meanwhile
            machine = self._machine
            accepted = machine.check_submit(header.client_id, header.round, header.sha256)
            if accepted is not None:
                return accepted, None
            # Last moment to notice a call that ended without a half-close
            # (cancelled, past its deadline): such an upload must not count.
            if alive is not None and not alive():
                raise CallEndedError(header.round)
            fastest, deadline = machine.fastest, machine.deadline
            accepted = machine.submit(header.client_id, header.round, header.sha256,
                                      writer.commit(), self._clock.now())
            if accepted.closed is not None:
                self._start_aggregation(accepted)
            elif machine.deadline != deadline:
                self._cond.notify_all()  # the timer sleeps until the old deadline
            return accepted, (machine.fastest if machine.fastest != fastest else None)

    def _record_fastest(self, round: int, seconds: float) -> None:
        try:
            self._journal.record_fastest(round, seconds)
        except OSError as error:  # a restart then counts 0: stricter, not wrong
            log.debug("cannot record round %d's timing: %s", round, error)

    def wait_for_model(self, client_id: str, round: int,
                       remaining: Callable[[], float | None],
                       alive: Callable[[], bool] | None = None) -> GlobalModel | None:
        """The global model after `round`; None if `remaining()` runs out, or
        `alive()` turns false (the caller went away: call `wake` then), first.
        Raises ShuttingDownError, CapacityError (too many waiters) and what
        RoundMachine.model_status raises. Call `fetched` once it is delivered."""
        self._check_running()
        with self._cond:
            if self._machine.model_status(client_id, round) is not ModelStatus.READY:
                if self._waiters >= self._config.capacity:
                    raise CapacityError(self._config.capacity)
                self._waiters += 1
                try:
                    while self._machine.model_status(client_id, round) is ModelStatus.PENDING:
                        self._check_running()
                        left = remaining()
                        if (left is not None and left <= 0) or (alive is not None
                                                                and not alive()):
                            return None
                        self._cond.wait(timeout=None if left is None else min(left, MAX_WAIT))
                finally:
                    self._waiters -= 1
            return self._model

    def next_round(self, client_id: str, after_round: int,
                   remaining: Callable[[], float | None],
                   alive: Callable[[], bool] | None = None) -> codec.Plan | None:
        """What the client does next (RoundMachine.assignment), waiting until
        that is known; None if `remaining()` runs out or `alive()` turns false
        first. Raises ShuttingDownError and what the machine raises."""
        self._check_running()
        with self._cond:
            while True:
                assignment = self._machine.assignment(client_id, after_round)
                if assignment is not None and self._settled(assignment):
                    break
                self._check_running()
                left = remaining()
                if (left is not None and left <= 0) or (alive is not None and not alive()):
                    return None
                self._cond.wait(timeout=None if left is None else min(left, MAX_WAIT))
            evaluate = after_round if self._evaluations.wants(client_id, after_round) else 0
            config = (self._strategy.round_config(assignment.round)
                      if assignment.role is Role.TRAIN else {})
            if assignment.role is Role.FINISHED and after_round == assignment.model_round:
                self._end.fetched.add(client_id)  # it has the final model and knows the end
                self._cond.notify_all()
            return codec.Plan(assignment.role.value, assignment.round, assignment.model_round,
                              dict(config), evaluate)

    def withdraw(self, round: int, clients: frozenset[str]) -> None:
        """Secure aggregation left `clients` out of round `round`'s key
        exchange (or gave up on it): they cannot send for it, so the barrier
        stops waiting for them (RoundMachine.withdraw). Idempotent: every
        stream of the round may report it."""
        with self._cond:
            machine = self._machine
            if machine.phase is not Phase.COLLECTING or round != machine.open_round:
                return
            outcome = machine.withdraw(clients, round, self._clock.now())
            if isinstance(outcome, Aborted):
                log.warning("round %d aborted: too few clients left in its secure "
                            "aggregation", round)
                self._spool.drop_round(round)
                self._after_transition()
            elif outcome is not None and outcome.closed is not None:
                self._start_aggregation(outcome)

    def _settled(self, assignment: Assignment) -> bool:
        # A secure round trains only once its cohort is known (no early
        # updates: the keys are exchanged within the cohort first).
        return not (self.secure is not None and assignment.role is Role.TRAIN
                    and self._machine.phase is not Phase.COLLECTING)

    def report_evaluation(self, client_id: str, round: int, num_examples: int,
                          metrics: Mapping[str, float]) -> bool:
        """Counts a client's evaluation of a global model; True unless it was
        counted before. Raises UnknownClientError, EvaluationClosedError."""
        self._check_running()
        with self._cond:
            self._machine.check_known(client_id)
            counted, result = self._evaluations.report(client_id, round, num_examples, metrics)
        if result is not None:
            self._round_log.evaluation(result)
        return counted

    def wake(self) -> None:
        """Wakes every waiter to look again (e.g. one whose call has ended)."""
        with self._cond:
            self._cond.notify_all()

    def fetched(self, client_id: str, round: int) -> None:
        """The model of `round` has reached `client_id`: after the last round,
        the run is over once every active client has its final model."""
        if self._config.assigns_rounds:
            return  # such a client is done once NextRound has told it the run is over
        with self._cond:
            machine = self._machine
            if machine.phase is Phase.FINISHED and round == machine.published_round:
                self._end.fetched.add(client_id)
                self._cond.notify_all()

    def shutdown(self) -> None:
        """Refuses new calls and wakes every waiter (they get ShuttingDownError).
        Uploads already past their checks may still be counted: stop the
        transport, then `close`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.secure is not None:
            self.secure.abort_all("the server is stopping")

    def secure_cohort(self, client_id: str, round: int) -> frozenset[str]:
        """The cohort of `round` if it is the open round collecting updates
        (a secure round may begin); raises what NextRound would, else
        SecAggOrderError."""
        self._check_running()
        with self._cond:
            machine = self._machine
            machine.check_known(client_id)
            if machine.phase is not Phase.COLLECTING or round != machine.open_round:
                raise SecAggOrderError(f"round {round} is not open for updates (the open "
                                       f"round is {machine.open_round}, {machine.phase.value})")
            return machine.cohort

    def close(self, timeout: float = 30.0) -> None:
        """`shutdown`, then waits for the timer and any running aggregation (so
        that its model is on disk), then releases the state dir: last, so that
        no other server can take it while this one still writes."""
        self.shutdown()
        self._timer.join(timeout)
        with self._cond:
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout)
        if any(worker.is_alive() for worker in workers):
            # Still writing a model: keep the lock; the process's exit releases it.
            log.error("an aggregation is still running after %.0f s; the state dir stays "
                      "locked until this process exits", timeout)
            return
        self._state.close()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._machine.phase is Phase.FINISHED

    @property
    def model(self) -> GlobalModel:
        with self._cond:
            return self._model

    @property
    def storage_ok(self) -> bool:
        return self._storage.ok

    # -- rounds -------------------------------------------------------------------

    def _start_aggregation(self, accepted: Accepted[SpooledUpdate]) -> None:
        # Called under the lock, right after the machine closed the round.
        worker = threading.Thread(target=self._aggregate, args=(accepted,),
                                  name=f"aggregate-{accepted.round}", daemon=True)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()

    def _aggregate(self, accepted: Accepted[SpooledUpdate]) -> None:
        try:
            self._aggregate_and_publish(accepted)
        except Exception as error:
            self._fail(f"aggregating round {accepted.round}", error)

    def _fail(self, what: str, error: Exception) -> None:
        # Fail-stop: a round stuck in AGGREGATING would hold every client until
        # its deadline. Stopping releases them (UNAVAILABLE: they retry), and a
        # restart re-aggregates the round from its acknowledged updates on disk.
        log.critical("%s failed (%s: %s); stopping. A restart on the same state dir "
                     "resumes from what is on disk (a round being aggregated is "
                     "aggregated again from its spooled updates).", what,
                     type(error).__name__, error, exc_info=error)
        self.shutdown()
        if self._config.on_failure is not None:
            self._config.on_failure(error)

    def _aggregate_and_publish(self, accepted: Accepted[SpooledUpdate]) -> None:
        assert accepted.closed is not None
        updates = [u.payload for u in accepted.closed]
        started = time.perf_counter()
        opened_at = self._machine.opened_at  # stable: the round cannot reopen before publish
        payload: bytes | bytearray
        if self.secure is not None:
            try:
                payload, num_updates, total_examples = secure_average(
                    self.secure, accepted.round, updates, self.specs,
                    lambda: not self._stopping)
            except SecAggAbortedError as error:
                self._abort_secure_round(accepted.round, error)
                return
            state, metrics = self._server_state, {}
        else:
            with SpoolReader(updates) as reader:
                result = Driver(self.specs, self._strategy, reader, updates,
                                self._model.payload, self._server_state).run()
            payload, state = result.payload, result.state
            num_updates, total_examples = len(updates), sum(u.num_examples for u in updates)
            fractions = weight_fractions([u.num_examples for u in updates])
            metrics = average_metrics(fractions, [u.header.metrics for u in updates])
        faults.maybe_crash("during_aggregation", accepted.round)
        if self._config.evaluator is not None:
            metrics.update(self._evaluate(payload))
        header = codec.ModelHeader(
            round=accepted.round, specs=self.specs, sha256=hashlib.sha256(payload).digest(),
            num_updates=num_updates, total_examples=total_examples, metrics=metrics)
        if self._strategy.optimizer is not None:  # the state first: see StateDir
            save_state = functools.partial(self._state.save_server_state, accepted.round,
                                           self._state_specs, state)
            if not self._write_until_done(f"the server state of round {accepted.round}",
                                          save_state):
                return  # stopping: a restart aggregates the round again
        save = functools.partial(self._state.save_model, header, payload, crash=functools.partial(
            faults.maybe_crash, "during_model_write", accepted.round))
        if not self._write_until_done(f"the global model of round {accepted.round}", save):
            return  # stopping: a restart aggregates the round again
        with self._cond:
            previous = self._model.header.round
            self._model = GlobalModel(header, payload)
            self._server_state = state
            self._machine.published(accepted.round, self._clock.now())
            evaluated = self._evaluations.published(accepted.round, self._machine.active)
            self._after_transition()
            if self._adopt_next_round:
                self._adopt_next_round = False
                self._adopt_spooled()
            self._journal.drop_aborted_before(previous)
        # Keep this round's updates until the next model is out: if the model
        # file just written turns out corrupt, they rebuild it. Rounds between
        # the two published ones were aborted and dropped then; older ones
        # were dropped at start-up (Journal.resume).
        self._spool.drop_round(previous)
        self._state.drop_server_states_before(previous)
        self._round_log.round(header, time.perf_counter() - started,
                             None if opened_at is None else self._clock.now() - opened_at)
        if evaluated is not None:
            self._round_log.evaluation(evaluated)
        if self.secure is not None:
            self.secure.finish(accepted.round, num_updates, total_examples)
        faults.maybe_crash("after_publish", accepted.round)

    def _abort_secure_round(self, round: int, error: SecAggAbortedError) -> None:
        """Secure aggregation lost too many clients: the round is aborted (its
        masked updates are useless without their reveals), the model stays."""
        with self._cond:
            if self._stopping:
                return  # a restart runs the round again
            try:
                self._journal.record_aborted(round)
            except OSError as failure:  # a restart then runs the round again: also fine
                log.debug("cannot record round %d's abort: %s", round, failure)
            self._machine.aggregation_aborted(round, self._clock.now())
            log.warning("round %d aborted: %s", round, error)
            self._spool.drop_round(round)
            self._after_transition()

    def _evaluate(self, payload: bytes | bytearray) -> dict[str, float]:
        # A broken evaluator must not stop training (nor, as a fail-stop, make
        # every restart fail again on the same round): the metrics go without.
        assert self._config.evaluator is not None
        try:
            model = codec.state_dict_from_payload(self.specs, payload)
            return {f"eval_{k}": v for k, v in self._config.evaluator(model).items()}
        except Exception:
            log.exception("evaluating the global model failed; publishing it without eval_*")
            return {}

    # -- the timer: round deadlines and the end of the run ---------------------------

    def _timer_loop(self) -> None:
        try:
            self._run_timer()
        except Exception as error:
            self._fail("the timer", error)

    def _run_timer(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self._clock.now()
                deadline = self._machine.deadline
                if deadline is not None and now >= deadline:
                    self._apply_deadline(now)
                    continue
                if self._end.over(self._machine.active, now, self._evaluations.waiting()):
                    self._end.reported = True
                    on_finished = self._config.on_finished
                else:
                    wake = min((t for t in (deadline, self._end.wake_at()) if t is not None),
                               default=None)
                    self._clock.wait(self._cond, None if wake is None else wake - now)
                    continue
            if on_finished is not None:  # outside the lock: it may stop the server
                on_finished()

    def _apply_deadline(self, now: float) -> None:
        # Under the lock. The record first: a crash after it reads as closed
        # (or aborted); if the disk refuses it, the round stays open and the
        # record is tried again.
        machine = self._machine
        round = machine.open_round
        closing = machine.closes_at_deadline()
        try:
            if closing:
                self._journal.record_closed(round, list(machine.received))
            else:
                self._journal.record_aborted(round)
        except OSError as error:
            self._storage.failed(f"the deadline record of round {round}", error)
            self._clock.wait(self._cond, STORAGE_RETRY_MAX)
            return
        outcome = machine.tick(now)
        if isinstance(outcome, Aborted):
            log.warning("round %d aborted at its deadline: %d updates, quorum %d",
                        round, len(outcome.discarded), self._config.min_clients)
            self._spool.drop_round(round)
            self._after_transition()
        elif isinstance(outcome, Accepted):
            log.info("round %d closed at its deadline with %d of %d updates",
                     outcome.round, outcome.received, outcome.expected)
            self._persist_round_opened()  # a round that never opened: its cohort now
            self._start_aggregation(outcome)

    def _after_transition(self) -> None:
        # Under the lock, after a round was published or aborted.
        self._persist_round_opened()
        machine = self._machine
        if machine.phase is Phase.FINISHED and self._end.finish(self._clock.now()):
            log.info("run finished after round %d; serving the final model (round %d) "
                     "until every client has fetched it, at most %.0f s",
                     machine.open_round - 1, machine.published_round, self._config.linger)
        self._cond.notify_all()

    def _persist_round_opened(self) -> None:
        # Under the lock: record each round's cohort once, when it opens. If
        # the disk refuses, the next call tries again (until then a restart
        # would open the round afresh from the registered clients).
        machine = self._machine
        if machine.cohort and machine.open_round > self._persisted_round:
            try:
                self._journal.record_cohort(machine.open_round, machine.cohort)
            except OSError as error:
                self._storage.failed(f"the cohort of round {machine.open_round}", error)
                return
            self._persisted_round = machine.open_round
            self._cond.notify_all()  # the timer may have a new deadline

    # -- storage ----------------------------------------------------------------------

    def _write(self, what: str, write: Callable[..., None], *args: object) -> None:
        try:
            write(*args)
        except OSError as error:
            raise self._storage_error(what, error) from error
        self._storage.recovered()

    def _write_until_done(self, what: str, write: Callable[[], None]) -> bool:
        """Retries `write` with backoff while the disk refuses it. False if the
        server began stopping first."""
        delay = STORAGE_RETRY_INITIAL
        while True:
            try:
                write()
            except OSError as error:
                self._storage.failed(what, error)
                with self._cond:
                    if not self._stopping:
                        self._clock.wait(self._cond, delay)
                    if self._stopping:
                        return False
                delay = min(2 * delay, STORAGE_RETRY_MAX)
                continue
            self._storage.recovered()
            return True

    def _storage_error(self, what: str, error: OSError) -> StorageError:
        self._storage.failed(what, error)
        return StorageError(what, error)

    def _sync_round(self, round: int) -> None:
        try:
            self._spool.sync_round(round)
        except OSError as error:
            raise self._storage_error(f"round {round}'s directory", error) from error

    # -- recovery -------------------------------------------------------------------

    def _resume(self) -> None:
        self._state.check_run({"initial_sha256": self._model.header.sha256.hex(),
                               "tensors": len(self.specs), "strategy": repr(self._strategy)})
        stored = self._state.load_model()
        if stored is not None:
            if stored.header.specs != self.specs:
                raise DecodeError(f"state dir {self._state.root} holds a different model; "
                                  "use another --state-dir or --fresh")
            self._model = GlobalModel(stored.header, stored.payload)
        published = self._model.header.round
        self._server_state = self._load_server_state(published)
        resume = self._journal.resume(published, self.update_specs)
        received = resume.received
        if self.secure is not None and received:
            # The keys and shares of that attempt are gone with the process:
            # its masked updates can never be unmasked. The round runs again.
            log.info("resuming: the secure round %d starts again (%d masked updates "
                     "dropped)", resume.open_round, len(received))
            self._spool.drop_round(resume.open_round)
            received = []
        now = self._clock.now()
        closed = self._machine.restore(
            self._state.load_clients(), published, resume.open_round, resume.cohort,
            [Update(u.header.client_id, u.header.sha256, u) for u in received], now,
            resume.last, resume.timing)
        self._persisted_round = resume.open_round if resume.cohort else 0
        # Only a round re-aggregated at start-up can have a successor with
        # updates already on disk (see _adopt_spooled); no other publish looks.
        self._adopt_next_round = closed is not None
        with self._cond:
            if closed is not None:
                log.info("resuming: round %d is complete on disk; aggregating it",
                         resume.open_round)
                self._start_aggregation(closed)
            self._after_transition()
        if published or resume.received or self._machine.registered:
            log.info("resumed from %s: global model of round %d, round %d open with %d "
                     "acknowledged updates", self._state.root, published, resume.open_round,
                     len(resume.received))

    def _adopt_spooled(self) -> None:
        # Under the lock, after the first publish since a resume that had to
        # re-aggregate a round (the latest model file was corrupt or missing):
        # the new open round may already hold acknowledged updates on disk.
        # Count them, or their clients would wait for ever.
        machine = self._machine
        for update in self._spool.load_round(machine.open_round, self.update_specs):
            header = update.header
            if header.client_id in machine.cohort and header.client_id not in machine.received:
                accepted = machine.submit(header.client_id, header.round, header.sha256, update,
                                          self._clock.now())
                if accepted.closed is not None:
                    self._start_aggregation(accepted)

    def _load_server_state(self, published: int) -> bytearray:
        optimizer = self._strategy.optimizer
        if optimizer is None or published == 0:
            return initial_state(self.specs, optimizer, self._model.payload)
        stored = self._state.load_server_state(published)
        if stored is None or stored.header.specs != self._state_specs:
            raise StateDirError(f"state dir {self._state.root} has no server optimizer state "
                                f"for round {published}; it cannot resume this run")
        return bytearray(stored.payload)

    # -- odds and ends ----------------------------------------------------------------

    def _check_model(self, specs: codec.ModelSpec) -> None:
        try:
            codec.check_specs_match(specs, self.specs)
        except MalformedUpdateError as error:
            mismatch = ModelMismatchError(f"the client's model is not the server's: {error}")
            mismatch.tensor = error.tensor
            raise mismatch from None

    def _check_running(self) -> None:
        faults.next_call()
        if self._stopping:
            raise ShuttingDownError()
