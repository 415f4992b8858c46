"""The round log: one JSON line per published round (and one per federated
evaluation, "kind": "evaluation"), appended to a file and to the server's log,
and the same as CSV beside it (the same name, ".csv": one row per record,
fixed columns). A line that cannot be written is lost; the round is not.

Standard library only, plus the records it formats.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from paramserver import codec
from paramserver.evaluation import EvaluationResult

log = logging.getLogger("paramserver.server")


class RoundLog:
    def __init__(self, path: Path | None,
                 listener: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self._path = path
        self._listener = listener

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

    def _append(self, record: Mapping[str, Any]) -> None:
        if self._listener is not None:
            self._listener(record)
        if self._path is None:
            return
        csv_path = self._path.with_suffix(".csv")
        try:
            with open(self._path, "a") as f:
                f.write(json.dumps(record) + "\n")
            new = not csv_path.exists()
            with open(csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(CSV_COLUMNS)
                writer.writerow(_row(record))
        except OSError as error:  # the round is published; only its log line is lost
            log.error("cannot append to the round log %s: %s", self._path, error)


CSV_COLUMNS = ("kind", "round", "num_updates", "total_examples", "loss", "accuracy",
               "eval_loss", "eval_accuracy", "sha256", "round_seconds")


def _row(record: Mapping[str, Any]) -> list[object]:
    metrics = record.get("metrics", {})
    kind = record.get("kind", "round")
    return [kind, record["round"], record.get("num_updates", record.get("clients", "")),
            record.get("total_examples", record.get("num_examples", "")),
            metrics.get("loss", ""), metrics.get("accuracy", ""), metrics.get("eval_loss", ""),
            metrics.get("eval_accuracy", ""), record.get("sha256", ""),
            record.get("round_seconds", "")]
