"""Chaos, short versions (the long repetitions live in benchmarks/chaos.py):
kill -9 of the server at exact points of a round and a restart; kill -9 of a
client before, during and after its upload and a restart; a client that dies
for good; SIGTERM during a round; a client started before the server.

Each run is 3 clients x 3 rounds with a fixed seed, so every run without a
permanent dropout must end with the same global model as the crash-free run.
The server listens on a unix socket in tmp_path: its address survives a
restart, which a port-0 TCP address would not. Crash points come from
PARAMSERVER_TEST_CRASH_AT (paramserver.faults), read only in these tests.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paramserver.faults import CLIENT_POINTS, CRASH_ENV, SERVER_POINTS

from .harness import ClientFactory, ClientProcess, ServerFactory, ServerProcess, wait_for

CLIENTS, ROUNDS, EXAMPLES = 3, 3, 200
NAMES = [f"client{i}" for i in range(1, CLIENTS + 1)]
CRASH_ROUND = 2


def socket_address(tmp_path: Path) -> tuple[str, str]:
    path = tmp_path / "ps.sock"
    return str(path), f"unix:{path}"


def start_server(server_factory: ServerFactory, socket: str, state: Path,
                 *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    return server_factory("--unix-socket", socket, *extra, clients=CLIENTS, rounds=ROUNDS,
                          state_dir=state, env=env)


def start_clients(client_factory: ClientFactory, address: str,
                  names: list[str] = NAMES) -> list[ClientProcess]:
    return [client_factory(name, address, "--seed", "0", examples=EXAMPLES) for name in names]


def finish(clients: list[ClientProcess]) -> None:
    for client in clients:
        code = client.wait(120)
        assert code == 0, f"{client.name} exited with {code}\n{client.log()}"


def merged_rounds(*servers: ServerProcess) -> list[dict[str, Any]]:
    return [record for server in servers for record in server.rounds()]


def check_run(records: list[dict[str, Any]], clients: list[ClientProcess],
              expected_updates: dict[int, int] | None = None) -> str:
    """No round published twice, no update lost or counted twice, every client
    saw the server's model for each of its rounds. Returns the final digest."""
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), records
    for record in records:
        updates = (expected_updates or {}).get(record["round"], CLIENTS)
        assert record["num_updates"] == updates, record
        assert record["total_examples"] == updates * EXAMPLES, record
    digests = {str(r["round"]): r["sha256"] for r in records}
    for client in clients:
        seen = client.summary()["rounds"]
        assert seen, f"{client.name} saw no round"
        for round, digest in seen.items():
            assert digest == digests[round], f"{client.name} round {round}: {seen} vs {digests}"
    return str(records[-1]["sha256"])


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The final model of the crash-free run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    logs: list[Path] = []
    with contextlib.ExitStack() as stack:
        servers = ServerFactory(stack, tmp_path, logs)
        clients = ClientFactory(stack, tmp_path, logs)
        socket, address = socket_address(tmp_path)
        server = start_server(servers, socket, tmp_path / "state")
        started = start_clients(clients, address)
        finish(started)
        server.wait_for_rounds(ROUNDS)
        yield check_run(server.rounds(), started)


def wait_killed(server: ServerProcess, timeout: float = 90.0) -> None:
    code = wait_for(lambda: server.process.poll() is not None or None, timeout,
                    "the server to crash at its crash point")
    assert code, server.log()
    assert server.process.returncode == -signal.SIGKILL, server.log()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("point", SERVER_POINTS)
def test_server_killed_at_crash_point_resumes_and_matches(
        point: str, server_factory: ServerFactory, client_factory: ClientFactory,
        tmp_path: Path, reference_digest: str) -> None:
    socket, address = socket_address(tmp_path)
    state = tmp_path / "state"
    first = start_server(server_factory, socket, state, env={CRASH_ENV: f"{point}:{CRASH_ROUND}"})
    clients = start_clients(client_factory, address)
    wait_killed(first)
    second = start_server(server_factory, socket, state)
    finish(clients)
    second.wait_for_rounds(ROUNDS - len(first.rounds()))
    assert "resumed from" in second.log(), second.log()
    assert check_run(merged_rounds(first, second), clients) == reference_digest


@pytest.mark.timeout(200)
@pytest.mark.parametrize("point", CLIENT_POINTS)
def test_client_killed_and_restarted_rejoins_and_matches(
        point: str, server_factory: ServerFactory, client_factory: ClientFactory,
        tmp_path: Path, reference_digest: str) -> None:
    socket, address = socket_address(tmp_path)
    server = start_server(server_factory, socket, tmp_path / "state")
    steady = start_clients(client_factory, address, NAMES[1:])
    # A unary upload cannot be cut in the middle: that case streams.
    streaming = ["--streaming"] if point == "client_during_upload" else []
    victim = client_factory(NAMES[0], address, "--seed", "0", *streaming, examples=EXAMPLES,
                            env={CRASH_ENV: f"{point}:{CRASH_ROUND}"})
    assert victim.wait(120) == -signal.SIGKILL, victim.log()
    restarted = client_factory(NAMES[0], address, "--seed", "0", examples=EXAMPLES)
    finish([*steady, restarted])
    server.wait_for_rounds(ROUNDS)
    assert check_run(server.rounds(), [*steady, restarted]) == reference_digest


@pytest.mark.timeout(200)
def test_client_dead_for_good_holds_up_one_round_at_most(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path) -> None:
    # The deadline gives every client as long as the fastest took plus 15 s:
    # only a dead client is that late, whatever the machine's load (and the
    # test pays those 15 s once, in round 2).
    socket, address = socket_address(tmp_path)
    server = start_server(server_factory, socket, tmp_path / "state",
                          "--round-timeout", "15", "--min-clients", "2")
    steady = start_clients(client_factory, address, NAMES[1:])
    victim = client_factory(NAMES[0], address, "--seed", "0", examples=EXAMPLES,
                            env={CRASH_ENV: f"client_before_upload:{CRASH_ROUND}"})
    assert victim.wait(120) == -signal.SIGKILL, victim.log()
    finish(steady)
    records = server.wait_for_rounds(ROUNDS)
    check_run(records, steady, expected_updates={2: 2, 3: 2})
    log = server.log()
    assert "round 2 closed at its deadline with 2 of 3 updates" in log
    # Round 3 no longer waits for the dead client: its cohort is the two
    # living clients, and it closes when both are in, not at a deadline.
    assert "round 3 closed at its deadline" not in log, log


@pytest.mark.timeout(200)
def test_sigterm_during_a_round_then_restart(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path,
        reference_digest: str) -> None:
    socket, address = socket_address(tmp_path)
    state = tmp_path / "state"
    first = start_server(server_factory, socket, state)
    clients = start_clients(client_factory, address)
    first.wait_for_rounds(1, timeout=90)
    assert first.stop() == 0, first.log()
    assert "state flushed" in first.log()
    second = start_server(server_factory, socket, state)
    finish(clients)
    second.wait_for_rounds(ROUNDS - len(first.rounds()))
    assert check_run(merged_rounds(first, second), clients) == reference_digest


@pytest.mark.timeout(200)
def test_clients_started_before_the_server(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path,
        reference_digest: str) -> None:
    socket, address = socket_address(tmp_path)
    clients = start_clients(client_factory, address)
    wait_for(lambda: all("retry" in c.log() for c in clients) or None, 60,
             "the clients to retry against the absent server")
    server = start_server(server_factory, socket, tmp_path / "state")
    finish(clients)
    server.wait_for_rounds(ROUNDS)
    assert check_run(server.rounds(), clients) == reference_digest
