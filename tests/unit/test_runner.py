"""The client's round loop (runner.py) and a Task, in-process against a real
server on 127.0.0.1:0: FedProx's setting reaches training, sampled-out clients
wait instead of failing, evaluation reports reach the round log."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from paramserver.client import ParameterServerClient
from paramserver.coordinator import ServerConfig
from paramserver.runner import ClientSummary, RoundReport, run_client
from paramserver.sampling import Sampling
from paramserver.server import RunningServer, create_server
from paramserver.strategies import FedProx
from paramserver.task import Result, Task

WAIT = 60.0


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def tiny_task(client: str, seen: list[Mapping[str, float]] | None = None) -> Task:
    generator = torch.Generator().manual_seed(sum(map(ord, client)))
    x = torch.randn(16, 4, generator=generator)
    y = (x[:, 0] > 0).long()

    class Spy(Task):
        def train(self, model: nn.Module, round: int, client: str,
                  config: Mapping[str, float] | None = None) -> Result:
            if seen is not None:
                seen.append(dict(config or {}))
            return super().train(model, round, client, config)

    return Spy(model=tiny_model, train_data=TensorDataset(x, y),
               test_data=TensorDataset(x[:4], y[:4]), batch_size=8)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    running: list[RunningServer] = []

    def start(**config: Any) -> RunningServer:
        base = {"clients": 2, "total_rounds": 2, "state_dir": tmp_path / "state",
                "durable": False, "round_log": tmp_path / "rounds.jsonl", "linger": 0.0}
        running.append(create_server(ServerConfig(**{**base, **config}),
                                     tiny_model().state_dict()))
        return running[-1]

    yield start
    for server in running:
        server.stop(grace=0)


def run_all(server: RunningServer, names: list[str], tasks: dict[str, Task],
            sent: list[RoundReport] | None = None) -> dict[str, ClientSummary]:
    """Runs the clients to the end; `sent` collects every acknowledged update."""
    def one(name: str) -> ClientSummary:
        with ParameterServerClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
            return run_client(client, tasks[name], name, round_wait=WAIT,
                              on_round=None if sent is None else sent.append)

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def round_log(tmp_path: Path, rounds: int) -> list[dict[str, Any]]:
    """The round log once it holds `rounds` training records (the server
    appends a round's record just after publishing its model)."""
    path = tmp_path / "rounds.jsonl"
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text() if path.exists() else ""
        records = [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
        if sum(1 for r in records if r.get("kind") != "evaluation") >= rounds:
            return records
        assert time.monotonic() < deadline, f"the round log has no {rounds} rounds: {records}"
        time.sleep(0.01)


def test_fedprox_sends_mu_to_every_training_round(serve: Any, tmp_path: Path) -> None:
    server = serve(strategy=FedProx(mu=0.25))
    seen: list[Mapping[str, float]] = []
    summaries = run_all(server, ["a", "b"], {"a": tiny_task("a", seen), "b": tiny_task("b")})
    assert len(seen) == 2  # a trained in both rounds
    assert all(config == {"proximal_mu": 0.25} for config in seen)
    finals = {s.rounds[2] for s in summaries.values()}
    assert finals == {round_log(tmp_path, 2)[-1]["sha256"]}


def test_the_proximal_term_holds_the_model_near_the_round_model() -> None:
    """20 epochs: without the term the model walks off; with mu = 5 (lr * mu
    = 0.5, a stable pull) it stays near where the round started."""
    task = dataclasses.replace(tiny_task("a"), epochs=20)
    drift = {}
    for mu in (0.0, 5.0):
        model = tiny_model()
        start = [p.detach().clone() for p in model.parameters()]
        task.train(model, 1, "a", {"proximal_mu": mu})
        drift[mu] = sum(float((p.detach() - s).norm())
                        for p, s in zip(model.parameters(), start, strict=True))
    assert drift[5.0] < drift[0.0] / 5


def test_clients_not_drawn_wait_for_the_round_and_still_finish(serve: Any,
                                                               tmp_path: Path) -> None:
    server = serve(clients=3, total_rounds=3, sampling=Sampling(seed=1, size=1))
    names = ["a", "b", "c"]
    sent: list[RoundReport] = []
    summaries = run_all(server, names, {n: tiny_task(n) for n in names}, sent)
    records = round_log(tmp_path, 3)
    assert [r["num_updates"] for r in records] == [1, 1, 1]
    final = records[-1]["sha256"]
    for summary in summaries.values():  # drawn or not, everyone ends with the final model
        assert summary.final is not None
        assert summary.final.sha256.hex() == final
    # One update a round. (A summary's rounds are those whose model its
    # client fetched: one that sent round 2's update may find round 3
    # already out when it asks, on a busy machine, and skip to it.)
    assert sorted(report.round for report in sent) == [1, 2, 3]


def test_federated_evaluation_lands_in_the_round_log(serve: Any, tmp_path: Path) -> None:
    server = serve(evaluate_every=1)
    summaries = run_all(server, ["a", "b"], {n: tiny_task(n) for n in ("a", "b")})
    evaluations = [r for r in round_log(tmp_path, 2) if r.get("kind") == "evaluation"]
    assert [r["round"] for r in evaluations] == [1, 2]
    for record in evaluations:
        assert record["clients"] == 2
        assert record["num_examples"] == 8  # two clients, 4 held-out examples each
        assert 0 <= record["metrics"]["accuracy"] <= 1
    assert all(set(s.evaluations) == {1, 2} for s in summaries.values())
