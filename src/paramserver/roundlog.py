"""The round log: one JSON line per published round (and one per federated
evaluation, "kind": "evaluation"), appended to a file and to the server's log.
A line that cannot be written is lost; the round it describes is not.

Standard library only, plus the records it formats.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from paramserver import codec
from paramserver.evaluation import EvaluationResult

log = logging.getLogger("paramserver.server")


class RoundLog:
    def __init__(self, path: Path | None) -> None:
        self._path = path

    def round(self, header: codec.ModelHeader, aggregation_seconds: float,
              round_seconds: float | None) -> None:
        record = {
            "round": header.round, "num_updates": header.num_updates,
            "total_examples": header.total_examples, "metrics": dict(header.metrics),
            "sha256": header.sha256.hex(), "aggregation_seconds": aggregation_seconds,
            "round_seconds": round_seconds,
        }
        log.info("round %d closed: %s", header.round, json.dumps(record))
        self._append(record)

    def evaluation(self, result: EvaluationResult) -> None:
        record = {"round": result.round, "kind": "evaluation", "clients": result.clients,
                  "cohort": result.cohort, "num_examples": result.num_examples,
                  "metrics": dict(result.metrics)}
        log.info("round %d evaluated: %s", result.round, json.dumps(record))
        self._append(record)

    def _append(self, record: Mapping[str, object]) -> None:
        if self._path is None:
            return
        try:
            with open(self._path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:  # the round is published; only its log line is lost
            log.error("cannot append to the round log %s: %s", self._path, error)
