"""The server's engine: the one lock around the round machine, the waiting,
the deadline timer, aggregation, and durability. No grpc: server.py adapts it
to RPCs, so everything here can be driven directly by tests.

Locking: `_cond` guards the round machine and the published global model. It
is never held while a payload crosses the network or the disk (receiving and
fsyncing an update, aggregating, writing the model), only while the machine
decides, an update file is renamed into place, and small state files change.
Waiters at the barrier sleep on the condition (no polling) and are woken when a
model is published, a round is aborted, or the server shuts down.

Durability (ordering is the point):
  ack an update      after its file is fsynced, renamed into its round dir
                     (under the lock) and the dir fsynced (outside it)
  close a round      if some of the cohort is missing (deadline), write
                     closed.json (who is in it) before aggregating
  publish            write the model (keeping the previous), then open the next
                     round (cohort.json), then drop the old round's files
  abort a round      write an abort marker (beside the round dirs, which
                     are dropped), then open the next round
A restart reads this back (`_resume`) and continues the same round with every
update it had acknowledged; the result is bit-identical to a run without the
crash because the average depends only on the set of updates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paramserver import codec, faults
from paramserver.averaging import average_metrics, validate_state_dict, weight_fractions
from paramserver.errors import CapacityError, DecodeError, ShuttingDownError
from paramserver.rounds import (
    Aborted,
    Accepted,
    ModelStatus,
    Phase,
    Registration,
    RoundMachine,
    Update,
)
from paramserver.spool import Spool, SpooledUpdate, aggregate
from paramserver.state import StateDir

log = logging.getLogger("paramserver.server")

Evaluator = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]

@dataclass(frozen=True)
class GlobalModel:
    """A published global model: immutable, so it is served without the lock."""

    header: codec.ModelHeader
    payload: bytes | bytearray


@dataclass
class ServerConfig:
    min_clients: int = 2  # registrations before round 1
    total_rounds: int = 0
    capacity: int = 256
    round_timeout: float | None = None
    quorum: int = 1  # updates a round needs to close at its deadline
    chunk_size: int = codec.DEFAULT_CHUNK_SIZE
    state_dir: Path | None = None
    durable: bool = True  # fsync every acknowledged update and published model
    round_log: Path | None = None  # JSON lines, one per published round
    evaluator: Evaluator | None = field(default=None, repr=False)
    # Called (from the failing thread) when the server cannot go on: e.g. an
    # aggregation hit an I/O error. The coordinator has already stopped.
    on_failure: Callable[[BaseException], None] | None = field(default=None, repr=False)


class Coordinator:
    """Runs the rounds of one server. See the module docstring."""

    def __init__(self, config: ServerConfig, initial_model: Mapping[str, torch.Tensor],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.state_dir is None:
            raise ValueError("a state directory is needed")
        self._config = config
        self._clock = clock
        self._cond = threading.Condition()
        self._state = StateDir(config.state_dir, durable=config.durable)
        self._spool = Spool(config.state_dir / "updates", durable=config.durable)
        self._machine: RoundMachine[SpooledUpdate] = RoundMachine(
            min_clients=config.min_clients, total_rounds=config.total_rounds,
            capacity=config.capacity, round_timeout=config.round_timeout, quorum=config.quorum)
        self.specs = codec.spec_of(initial_model)
        validate_state_dict(initial_model, self.specs)
        payload = b"".join(codec.payload_views(initial_model))
        self._model = GlobalModel(
            codec.ModelHeader(0, self.specs, hashlib.sha256(payload).digest()), payload)
        self._waiters = 0
        self._stopping = False
        self._persisted_round = 0
        self._adopt_next_round = False
        self._aborted_rounds: list[int] = []  # since start-up, markers not yet dropped
        self._workers: list[threading.Thread] = []
        self._resume()
        self._timer = threading.Thread(target=self._deadline_loop, name="deadlines", daemon=True)
        self._timer.start()

    # -- called by the transport ------------------------------------------------

    def register(self, name: str) -> Registration:
        self._check_running()
        with self._cond:
            reg = self._machine.register(name, self._clock())
            if reg.is_new:
                self._state.save_clients(self._machine.clients)
                log.info("client %s registered, first round %d", name, reg.first_round)
            self._persist_round_opened()
            return reg

    def check_submit(self, header: codec.UpdateHeader) -> Accepted[SpooledUpdate] | None:
        """Raises what the update would be refused for; returns the ack of a duplicate."""
        self._check_running()
        with self._cond:
            duplicate = self._machine.check_submit(header.client_id, header.round, header.sha256)
        if duplicate is None:
            codec.check_specs_match(header.specs, self.specs)
        else:  # the original may still be between its rename and its dir fsync
            self._spool.sync_round(header.round)
        return duplicate

    def submit(self, header: codec.UpdateHeader, chunks: Iterable[codec.Buffer],
               ) -> Accepted[SpooledUpdate]:
        """An update from the transport: refused (raises), acknowledged as a
        duplicate without reading `chunks` (a lazy stream stays unread), or
        received."""
        duplicate = self.check_submit(header)
        return duplicate if duplicate is not None else self.receive(header, chunks)

    def receive(self, header: codec.UpdateHeader, chunks: Iterable[codec.Buffer],
                ) -> Accepted[SpooledUpdate]:
        """Streams an update to disk, checking it as it arrives, then counts it.
        Raises MalformedUpdateError/DecodeError or what `check_submit` raises;
        then nothing is counted and nothing is left on disk."""
        checker = codec.PayloadChecker(header.specs, header.sha256)
        writer = self._spool.writer(header)
        try:
            for chunk in chunks:
                checker.feed(chunk)
                writer.write(chunk)
            checker.finish()
            writer.seal()  # the fsync, outside the lock
            with self._cond:  # re-decide: the round may have moved on meanwhile
                accepted = self._machine.check_submit(header.client_id, header.round,
                                                      header.sha256)
                if accepted is None:
                    accepted = self._machine.submit(header.client_id, header.round,
                                                    header.sha256, writer.commit())
                    if accepted.closed is not None:
                        self._start_aggregation(accepted)
        finally:
            writer.discard()  # no-op after commit
        # The rename's fsync, outside the lock (under it, every upload of a
        # round queued behind the others' fsyncs). For a duplicate it is the
        # original's, which may still be on its way to disk in another call.
        self._spool.sync_round(header.round)
        faults.maybe_crash("before_ack", header.round)
        faults.crash_at_next_call("after_ack", header.round)
        return accepted

    def wait_for_model(self, client_id: str, round: int,
                       remaining: Callable[[], float | None]) -> GlobalModel | None:
        """The global model after `round`; None if `remaining()` runs out first.
        Raises ShuttingDownError, CapacityError (too many waiters) and what
        RoundMachine.model_status raises."""
        self._check_running()
        with self._cond:
            if self._machine.model_status(client_id, round) is ModelStatus.READY:
                return self._model
            if self._waiters >= self._config.capacity:
                raise CapacityError(self._config.capacity)
            self._waiters += 1
            try:
                while self._machine.model_status(client_id, round) is ModelStatus.PENDING:
                    self._check_running()
                    left = remaining()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(timeout=left)
                return self._model
            finally:
                self._waiters -= 1

    def shutdown(self, timeout: float = 30.0) -> None:
        """Wakes every waiter (they get ShuttingDownError), refuses new work,
        and waits for a running aggregation so that its model is on disk."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout)
        self._state.close()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._machine.phase is Phase.FINISHED

    @property
    def model(self) -> GlobalModel:
        with self._cond:
            return self._model

    # -- rounds -------------------------------------------------------------------

    def _start_aggregation(self, accepted: Accepted[SpooledUpdate]) -> None:
        # Called under the lock, right after the machine closed the round.
        assert accepted.closed is not None
        closed = [u.client_id for u in accepted.closed]
        if set(closed) != self._machine.cohort:
            # Closed at its deadline without some of the cohort: a restart
            # must aggregate exactly these. A round closed by its whole cohort
            # needs no record: cohort.json and the update files say as much.
            self._state.write_json(self._spool.round_dir(accepted.round) / "closed.json",
                                   {"round": accepted.round, "clients": closed})
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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._config.on_failure is not None:
            self._config.on_failure(error)

    def _aggregate_and_publish(self, accepted: Accepted[SpooledUpdate]) -> None:
        assert accepted.closed is not None
        updates = [u.payload for u in accepted.closed]
        started = time.perf_counter()
        opened_at = self._machine.opened_at  # stable: the round cannot reopen before publish
        payload = aggregate(self.specs, updates)
        faults.maybe_crash("during_aggregation", accepted.round)
        fractions = weight_fractions([u.num_examples for u in updates])
        metrics = average_metrics(fractions, [u.header.metrics for u in updates])
        if self._config.evaluator is not None:
            metrics.update(self._evaluate(payload))
        header = codec.ModelHeader(
            round=accepted.round, specs=self.specs, sha256=hashlib.sha256(payload).digest(),
            num_updates=len(updates), total_examples=sum(u.num_examples for u in updates),
            metrics=metrics)
        self._state.save_model(header, payload, crash=functools.partial(
            faults.maybe_crash, "during_model_write", accepted.round))
        with self._cond:
            previous = self._model.header.round
            self._model = GlobalModel(header, payload)
            self._machine.published(accepted.round, self._clock())
            self._persist_round_opened()
            if self._adopt_next_round:
                self._adopt_next_round = False
                self._adopt_spooled()
            self._cond.notify_all()
        # Keep this round's updates until the next model is out: if the model
        # file just written turns out corrupt, they rebuild it. Rounds between
        # the two published ones were aborted and dropped then; older ones
        # were dropped at start-up (_find_open_round).
        self._spool.drop_round(previous)
        self._drop_abort_markers_before(previous)
        self._log_round(header, time.perf_counter() - started, opened_at)

    def _drop_abort_markers_before(self, round: int) -> None:
        # Like update files, a marker is kept while the model published after
        # it might still be rebuilt from the previous one (recovery walks the
        # aborted rounds from there); older ones go. Markers from before a
        # restart were dropped by _find_open_round.
        with self._cond:
            old = [r for r in self._aborted_rounds if r < round]
            self._aborted_rounds = [r for r in self._aborted_rounds if r >= round]
        for aborted in old:
            self._spool.aborted_marker(aborted).unlink(missing_ok=True)

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

    def _deadline_loop(self) -> None:
        try:
            self._run_deadlines()
        except Exception as error:  # e.g. writing closed.json or an abort marker
            self._fail("the deadline timer", error)

    def _run_deadlines(self) -> None:
        with self._cond:
            while not self._stopping:
                deadline = self._machine.deadline
                now = self._clock()
                if deadline is None or now < deadline:
                    self._cond.wait(timeout=None if deadline is None else deadline - now)
                    continue
                outcome = self._machine.tick(now)
                if isinstance(outcome, Aborted):
                    self._on_abort(outcome)
                elif isinstance(outcome, Accepted):
                    log.info("round %d closed at its deadline with %d of %d updates",
                             outcome.round, outcome.received, outcome.expected)
                    self._start_aggregation(outcome)

    def _on_abort(self, aborted: Aborted[SpooledUpdate]) -> None:
        # Under the lock. The marker first: a crash after it still reads as aborted.
        log.warning("round %d aborted at its deadline: %d updates, quorum %d",
                    aborted.round, len(aborted.discarded), self._config.quorum)
        self._state.write_json(self._spool.aborted_marker(aborted.round),
                               {"round": aborted.round})
        self._aborted_rounds.append(aborted.round)
        self._persist_round_opened()
        self._spool.drop_round(aborted.round)
        self._cond.notify_all()

    def _persist_round_opened(self) -> None:
        # Under the lock: record each round's cohort once, when it opens.
        machine = self._machine
        if machine.cohort and machine.open_round > self._persisted_round:
            self._state.save_cohort(machine.open_round, machine.cohort,
                                    self._spool.round_dir(machine.open_round))
            self._persisted_round = machine.open_round
            self._cond.notify_all()  # the deadline timer has a new deadline

    # -- recovery -------------------------------------------------------------------

    def _resume(self) -> None:
        self._state.check_run({"initial_sha256": self._model.header.sha256.hex(),
                               "tensors": len(self.specs)})
        stored = self._state.load_model()
        if stored is not None:
            if stored.header.specs != self.specs:
                raise DecodeError(f"state dir {self._state.root} holds a different model; "
                                  "use another --state-dir or --fresh")
            self._model = GlobalModel(stored.header, stored.payload)
        published = self._model.header.round
        open_round, cohort, received = self._find_open_round(published)
        closed = self._machine.restore(
            self._state.load_clients(), published, open_round, cohort,
            [Update(u.header.client_id, u.header.sha256, u) for u in received], self._clock())
        self._persisted_round = open_round if cohort else 0
        # Only a round re-aggregated at start-up can have a successor with
        # updates already on disk (see _adopt_spooled); no other publish looks.
        self._adopt_next_round = closed is not None
        if closed is not None:
            log.info("resuming: round %d is complete on disk; aggregating it", open_round)
            with self._cond:
                self._start_aggregation(closed)
        with self._cond:
            self._persist_round_opened()
        if published or received or self._machine.clients:
            log.info("resumed from %s: global model of round %d, round %d open with %d "
                     "acknowledged updates", self._state.root, published, open_round,
                     len(received))

    def _find_open_round(self, published: int,
                         ) -> tuple[int, frozenset[str] | None, list[SpooledUpdate]]:
        # Rounds after the published one are aborted (marked) or the open one.
        self._spool.drop_rounds_before(published)
        open_round = published + 1
        while self._spool.aborted_marker(open_round).exists():
            self._spool.drop_round(open_round)
            open_round += 1
        directory = self._spool.round_dir(open_round)
        cohort = self._state.load_cohort(directory)
        closed_file = directory / "closed.json"
        if closed_file.exists():  # closed before the crash: exactly those updates
            cohort = frozenset(json.loads(closed_file.read_text())["clients"])
        return open_round, cohort, self._spool.load_round(open_round, self.specs)

    def _adopt_spooled(self) -> None:
        # Under the lock, after the first publish since a resume that had to
        # re-aggregate a round (the latest model file was corrupt or missing):
        # the new open round may already hold acknowledged updates on disk.
        # Count them, or their clients would wait for ever.
        machine = self._machine
        for update in self._spool.load_round(machine.open_round, self.specs):
            header = update.header
            if header.client_id in machine.cohort and header.client_id not in machine.received:
                accepted = machine.submit(header.client_id, header.round, header.sha256, update)
                if accepted.closed is not None:
                    self._start_aggregation(accepted)

    # -- odds and ends ----------------------------------------------------------------

    def _check_running(self) -> None:
        faults.next_call()
        if self._stopping:
            raise ShuttingDownError()

    def _log_round(self, header: codec.ModelHeader, seconds: float,
                   opened_at: float | None) -> None:
        record = {
            "round": header.round, "num_updates": header.num_updates,
            "total_examples": header.total_examples, "metrics": dict(header.metrics),
            "sha256": header.sha256.hex(), "aggregation_seconds": seconds,
            "round_seconds": self._clock() - opened_at if opened_at is not None else None,
        }
        log.info("round %d closed: %s", header.round, json.dumps(record))
        if self._config.round_log is not None:
            try:
                with open(self._config.round_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as error:  # the round is published; only its log line is lost
                log.error("cannot append to the round log %s: %s", self._config.round_log, error)
