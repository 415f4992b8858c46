"""Strategies with real processes: a run per family (server optimizer, FedProx,
robust aggregation), client sampling with federated evaluation, and kill -9
of the server mid-round with FedAdam and with Krum, resumed bit-identically."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest

from paramserver.faults import CRASH_ENV

from .harness import ClientFactory, ClientProcess, ServerFactory, ServerProcess

EXAMPLES = 120
EXIT_TIMEOUT = 120.0


def finish(clients: list[ClientProcess]) -> None:
    for client in clients:
        code = client.wait(EXIT_TIMEOUT)
        assert code == 0, f"{client.name} exited with {code}\n{client.log()}"


def training_records(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    records = server.wait_for_rounds(count)
    return [r for r in records if r.get("kind") != "evaluation"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("strategy", [["--strategy", "fedadam", "--server-lr", "0.05"],
                                      ["--strategy", "fedprox", "--mu", "0.1"],
                                      ["--strategy", "median"],
                                      ["--strategy", "krum", "--byzantine", "0"]],
                         ids=lambda s: s[1])
def test_a_run_per_strategy_family(strategy: list[str], server_factory: ServerFactory,
                                   client_factory: ClientFactory) -> None:
    server = server_factory(*strategy, clients=3, rounds=2)
    clients = [client_factory(f"c{i}", server, examples=EXAMPLES) for i in range(3)]
    finish(clients)
    records = training_records(server, 2)
    assert [(r["round"], r["num_updates"]) for r in records] == [(1, 3), (2, 3)]
    final = records[-1]["sha256"]
    for client in clients:
        assert client.summary()["rounds"]["2"] == final, client.log()
    assert records[0]["sha256"] != records[1]["sha256"]


@pytest.mark.timeout(200)
def test_sampled_rounds_and_federated_evaluation(server_factory: ServerFactory,
                                                 client_factory: ClientFactory) -> None:
    server = server_factory("--sample-size", "2", "--evaluate-every", "1",
                            "--evaluate-fraction", "0.5", clients=4, rounds=2)
    clients = [client_factory(f"c{i}", server, examples=EXAMPLES) for i in range(4)]
    finish(clients)
    records = server.wait_for_rounds(2)
    training = [r for r in records if r.get("kind") != "evaluation"]
    assert [r["num_updates"] for r in training] == [2, 2]  # two of four, each round
    evaluations = [r for r in records if r.get("kind") == "evaluation"]
    assert [(r["round"], r["cohort"]) for r in evaluations] == [(1, 2), (2, 2)]
    assert all(r["clients"] == 2 and 0 <= r["metrics"]["accuracy"] <= 1 for r in evaluations)
    final = training[-1]["sha256"]
    sent = [c for c in clients if c.summary()["rounds"]]
    assert sent, "nobody trained"
    assert all(c.summary()["rounds"].get("2", final) == final for c in sent)


def run(stack: contextlib.ExitStack, logs: list[Path], workdir: Path, strategy: list[str],
        crash: str | None) -> str:
    """3 clients (the same names every run), 3 rounds on a unix socket; with
    `crash`, the server kills itself there and a second one resumes. Returns
    the final digest."""
    servers_at, clients_at = ServerFactory(stack, workdir, logs), ClientFactory(stack, workdir,
                                                                                logs)
    socket, state = workdir / "ps.sock", workdir / "state"
    extra = ("--unix-socket", str(socket), *strategy)
    first = servers_at(*extra, clients=3, rounds=3, state_dir=state,
                       env={CRASH_ENV: crash} if crash else None)
    clients = [clients_at(f"c{i}", f"unix:{socket}", "--seed", "0", examples=EXAMPLES)
               for i in range(3)]
    servers = [first]
    if crash:
        assert first.process.wait(EXIT_TIMEOUT) == -signal.SIGKILL, first.log()
        servers.append(servers_at(*extra, clients=3, rounds=3, state_dir=state))
    finish(clients)
    servers[-1].wait_for_rounds(3 - len(first.rounds()) if crash else 3)
    records = [r for s in servers for r in s.rounds() if r.get("kind") != "evaluation"]
    assert [r["round"] for r in records] == [1, 2, 3], records
    return str(records[-1]["sha256"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", [["--strategy", "fedadam"],
                                      ["--strategy", "krum", "--byzantine", "0",
                                       "--selected", "2"]], ids=lambda s: s[1])
def test_kill_9_mid_round_resumes_bit_identically(
        strategy: list[str], process_stack: contextlib.ExitStack, process_logs: list[Path],
        tmp_path: Path) -> None:
    """The optimizer's state (FedAdam) and the two passes (Krum) survive a
    crash while round 2 is being aggregated: the same final model as a run
    without the crash."""
    clean = run(process_stack, process_logs, tmp_path / "clean", strategy, None)
    crashed = run(process_stack, process_logs, tmp_path / "crashed", strategy,
                  "during_aggregation:2")
    assert crashed == clean
