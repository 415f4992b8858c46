"""The public Python API: a server in-process, a client for a Task, and a whole
federated experiment in one call.

    import paramserver as ps
    history = ps.run_experiment(my_task, clients=10, rounds=20, strategy="fedprox")

`serve` is a context manager that yields the running server (its address,
its history) and stops it cleanly; `run_client` runs one client of a Task
against an address; `run_experiment` does both, the clients in threads of
this process (or as processes, for tasks importable by name), and returns
the History: every round's metrics and digest, the federated evaluations, the
final state_dict.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramserver import codec, strategies
from paramserver.client import ParameterServerClient
from paramserver.config import ServerConfig
from paramserver.runner import ClientSummary, RoundReport
from paramserver.runner import run_client as _run_client
from paramserver.sampling import Sampling
from paramserver.security import ClientCredentials
from paramserver.server import RunningServer, create_server
from paramserver.task import Task
from paramserver.tasks import TaskContext, TaskFactory, evaluator

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class RoundRecord:
    """One published round: `metrics` holds the clients' weighted training
    metrics ("loss") and the server's evaluation ("eval_loss", "eval_accuracy")."""

    round: int
    num_updates: int
    total_examples: int
    metrics: Mapping[str, float]
    sha256: str


@dataclass(frozen=True)
class EvaluationRecord:
    """A federated evaluation: the clients' weighted metrics on held-out data."""

    round: int
    clients: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluations: list[EvaluationRecord] = field(default_factory=list)
    final_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    clients: dict[str, ClientSummary] = field(default_factory=dict)

    @property
    def final_sha256(self) -> str:
        return self.rounds[-1].sha256 if self.rounds else ""

    def accuracy(self) -> list[float]:
        """The server's test accuracy after each round (NaN without one)."""
        return [r.metrics.get("eval_accuracy", float("nan")) for r in self.rounds]


def read_history(run_dir: Path) -> History:
    """The History written to `run_dir`/metrics.jsonl (rounds and evaluations)."""
    history = History()
    path = Path(run_dir) / METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record.get("kind") == "evaluation":
            history.evaluations.append(EvaluationRecord(
                record["round"], record["clients"], record["num_examples"], record["metrics"]))
        else:
            history.rounds.append(RoundRecord(
                record["round"], record["num_updates"], record["total_examples"],
                record["metrics"], record["sha256"]))
    return history


METRICS_FILE = "metrics.jsonl"


class Server:
    """A running server (from `serve`)."""

    def __init__(self, running: RunningServer, run_dir: Path) -> None:
        self._running = running
        self.run_dir = run_dir
        self.port = running.port
        self.address = f"127.0.0.1:{running.port}"

    def history(self) -> History:
        history = read_history(self.run_dir)
        history.final_state_dict = self.model()
        return history

    def model(self) -> dict[str, torch.Tensor]:
        """The current global model."""
        global_model = self._running.coordinator.model
        return codec.state_dict_from_payload(global_model.header.specs, global_model.payload)


@contextlib.contextmanager
def serve(model: nn.Module | StateDict, *, clients: int, rounds: int,
          strategy: str | strategies.Strategy = "fedavg", run_dir: Path | None = None,
          test_task: Task | None = None, address: str = "127.0.0.1:0",
          **options: Any) -> Iterator[Server]:
    """A server for `model` (its state_dict is round 0) in this process,
    listening on `address` (port 0: any free port), waiting for `clients`
    registrations, running `rounds` rounds with `strategy` (a name from
    `paramserver strategies` or a Strategy). Metrics and state go to
    `run_dir` (a temporary directory if None). `test_task`: evaluate every
    global model on its test data. `options`: any other ServerConfig field
    (round_timeout, min_clients, sampling, evaluate_every, ...). Stops the
    server on exit."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    chosen = strategies.build(strategy) if isinstance(strategy, str) else strategy
    with contextlib.ExitStack() as stack:
        directory = Path(run_dir) if run_dir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="paramserver-")))
        directory.mkdir(parents=True, exist_ok=True)
        config = ServerConfig(
            clients=clients, total_rounds=rounds, strategy=chosen,
            state_dir=directory / "state", round_log=directory / METRICS_FILE,
            evaluator=evaluator(test_task) if test_task is not None else None,
            **{"linger": 5.0, "fresh": True, **options})
        running = create_server(config, state, address)
        try:
            yield Server(running, directory)
        finally:
            running.stop(grace=1.0)


def run_client(address: str, task: Task, name: str, *, rounds: int = 0,
               round_wait: float = 600.0, timeout: float = 60.0,
               on_round: Callable[[RoundReport], None] | None = None,
               credentials: ClientCredentials | None = None) -> ClientSummary:
    """Runs the client `name` of `task` against the server at `address`
    until the run ends; returns its summary (the digest of every global
    model its updates went into). `credentials`: TLS, a client certificate,
    a bearer token (security.ClientCredentials)."""
    with ParameterServerClient(address, timeout=timeout, credentials=credentials) as client:
        return _run_client(client, task, name, rounds=rounds, round_wait=round_wait,
                           on_round=on_round)


def run_experiment(task: TaskFactory, *, clients: int, rounds: int,
                   strategy: str | strategies.Strategy = "fedavg", seed: int = 0,
                   sample_fraction: float | None = None, evaluate_every: int = 0,
                   run_dir: Path | None = None, names: Sequence[str] | None = None,
                   on_round: Callable[[RoundReport], None] | None = None,
                   **options: Any) -> History:
    """A whole federated run in this process: a server and `clients` clients
    (threads), client i built by `task(TaskContext(name, i, clients, seed))`,
    the server's model and test data by `task(TaskContext(None, 0, clients,
    seed))`. Returns the History. `options`: more ServerConfig fields."""
    torch.manual_seed(seed)
    server_task = task(TaskContext(None, 0, clients, seed))
    torch.manual_seed(seed)
    model = server_task.model()
    names = list(names or [f"client{i}" for i in range(clients)])
    sampling = Sampling(seed, sample_fraction, None, 1) if sample_fraction else None
    with serve(model, clients=clients, rounds=rounds, strategy=strategy, run_dir=run_dir,
               test_task=server_task if server_task.test_data is not None else None,
               sampling=sampling, evaluate_every=evaluate_every, **options) as server:
        client_tasks = [task(TaskContext(name, i, clients, seed)) for i, name in enumerate(names)]
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(run_client, server.address, t, name, on_round=on_round)
                       for t, name in zip(client_tasks, names, strict=True)]
            summaries = [f.result() for f in futures]
        _wait_for_records(server, rounds)
        history = server.history()
    history.clients = {s.client: s for s in summaries}
    return history


def _wait_for_records(server: Server, rounds: int) -> None:
    # The server appends a round's record just after publishing its model: a
    # client can finish a moment before the last record is written.
    deadline = time.monotonic() + 30.0
    while len(server.history().rounds) < rounds and time.monotonic() < deadline:
        time.sleep(0.01)
