"""The resume files: what a restarted server reads to continue where a crashed
one stopped. One module owns them all, beside the update files they describe:

  updates/round-N/cohort.json    the cohort of round N, written when it opens
  updates/round-N/closed.json    the updates round N closed with at its deadline
                                 (written before the round closes)
  updates/round-N.aborted        round N was aborted (written before it is;
                                 kept beside the round dir, which is dropped)
  updates/round-N/timing.json    the fastest time of round N so far, for the
                                 deadline after a restart (best effort: not
                                 fsynced; without it a restart counts 0)

Ordering rules (the coordinator keeps them): a record is written before the
transition it describes, so that a crash in between reads as the transition
having happened or not, never as half of it.

Does file I/O through StateDir and Spool; must not import grpc.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from paramserver.codec import ModelSpec
from paramserver.errors import ParamServerError
from paramserver.rounds import LastRound, RoundTiming
from paramserver.spool import Spool, SpooledUpdate, read_update_header
from paramserver.state import StateDir, StateDirError, corrupt, read_json

log = logging.getLogger("paramserver.journal")

COHORT_FILE = "cohort.json"
CLOSED_FILE = "closed.json"
TIMING_FILE = "timing.json"


@dataclass(frozen=True)
class Resume:
    """The round a restarted server continues: `cohort` is None if it had not
    opened; `received` its acknowledged updates; `last` the published round."""

    open_round: int
    cohort: frozenset[str] | None
    received: list[SpooledUpdate]
    last: LastRound
    timing: RoundTiming


class Journal:
    """Writes and reads the resume files. Writes raise OSError (the caller
    decides what a full disk means)."""

    def __init__(self, state: StateDir, spool: Spool) -> None:
        self._state = state
        self._spool = spool
        self._aborted: list[int] = []  # since start-up, markers not yet dropped

    def record_cohort(self, round: int, cohort: frozenset[str]) -> None:
        self._state.write_json(self._spool.round_dir(round) / COHORT_FILE,
                               {"round": round, "cohort": sorted(cohort)})

    def record_closed(self, round: int, clients: list[str]) -> None:
        """A round about to close at its deadline with exactly `clients`: a
        restart must aggregate those, though others of its cohort could send."""
        self._state.write_json(self._spool.round_dir(round) / CLOSED_FILE,
                               {"round": round, "clients": sorted(clients)})

    def record_fastest(self, round: int, seconds: float) -> None:
        """Best effort (a lost record costs a restart a stricter deadline)."""
        self._state.write_json(self._spool.round_dir(round) / TIMING_FILE,
                               {"round": round, "fastest": seconds}, durable=False)

    def record_aborted(self, round: int) -> None:
        self._state.write_json(self._spool.aborted_marker(round), {"round": round})
        self._aborted.append(round)

    def drop_aborted_before(self, round: int) -> None:
        """Markers are kept while the model published after them might still be
        rebuilt from the one before (recovery walks the aborted rounds from
        there); older ones go. Those from before a restart went at start-up."""
        old = [r for r in self._aborted if r < round]
        self._aborted = [r for r in self._aborted if r >= round]
        for aborted in old:
            self._spool.aborted_marker(aborted).unlink(missing_ok=True)

    def resume(self, published: int, specs: ModelSpec) -> Resume:
        """Rounds after the published one are aborted (marked) or the open one;
        older rounds' files are dropped."""
        self._spool.drop_rounds_before(published)
        open_round = published + 1
        while self._spool.aborted_marker(open_round).exists():
            self._spool.drop_round(open_round)
            open_round += 1
        directory = self._spool.round_dir(open_round)
        cohort = _load_cohort(directory)
        closed = directory / CLOSED_FILE
        if closed.exists():  # closed before the crash: exactly those updates
            cohort = _names(closed, "clients")
        timing = RoundTiming(_load_fastest(directory),
                             _load_fastest(self._spool.round_dir(published)))
        return Resume(open_round, cohort, self._spool.load_round(open_round, specs),
                      self._last_round(published), timing)

    def _last_round(self, published: int) -> LastRound:
        # The published round's files stay until the next model is out: their
        # headers recognise the retry of an upload whose ack a crash swallowed.
        directory = self._spool.round_dir(published)
        digests = {}
        for path in sorted(directory.glob("*.update")) if directory.is_dir() else []:
            try:
                header = read_update_header(path)
            except (ParamServerError, OSError) as error:
                log.warning("cannot read %s: %s", path, error)
                continue
            digests[header.client_id] = header.sha256
        cohort = _load_cohort(directory)
        return LastRound(len(cohort) if cohort is not None else len(digests), digests)


def _load_fastest(directory: Path) -> float | None:
    try:
        document = read_json(directory / TIMING_FILE)
    except (OSError, StateDirError):
        return None  # none recorded, or torn: it was not fsynced
    value = document.get("fastest") if isinstance(document, dict) else None
    if type(value) is int:
        value = float(min(value, 2**53))  # a float() of a huge int overflows
    return value if isinstance(value, float) and 0 <= value < math.inf else None


def _load_cohort(directory: Path) -> frozenset[str] | None:
    path = directory / COHORT_FILE
    if not path.exists():
        return None
    return _names(path, "cohort")


def _names(path: Path, key: str) -> frozenset[str]:
    """The client names a cohort or closed file lists under `key`."""
    document = read_json(path)
    names = document.get(key) if isinstance(document, dict) else None
    # A round never opens (or closes) with nobody in it.
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise corrupt(path, f"no list of client names under {key!r}")
    return frozenset(names)
