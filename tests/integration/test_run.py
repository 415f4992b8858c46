"""Whole runs with real processes: a server and clients, a late joiner, the demo."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from paramserver import codec, processes, training
from paramserver.client import ParameterServerClient

from .harness import ClientFactory, ServerFactory, ServerProcess, read_log, running_group


def _check_exit(code: int, who: str, log: str) -> None:
    assert code == 0, f"{who} exited with {code}\n{log}"


def _digests_by_round(records: list[dict[str, object]]) -> dict[str, str]:
    return {str(r["round"]): str(r["sha256"]) for r in records}


@pytest.mark.timeout(150)
def test_three_clients_three_rounds(server_factory: ServerFactory,
                                    client_factory: ClientFactory) -> None:
    server = server_factory(clients=3, rounds=3, eval_examples=200)
    clients = [client_factory(f"client{i}", server, examples=200) for i in (1, 2, 3)]

    for client in clients:
        _check_exit(client.wait(), client.name, client.log())
    records = server.wait_for_rounds(3)
    server_log = server.log()
    _check_exit(server.stop(), "server (after SIGTERM)", server_log)

    assert [r["round"] for r in records] == [1, 2, 3], records
    for record in records:
        assert record["num_updates"] == 3, record
        assert record["total_examples"] == 3 * 200, record
        metrics = record["metrics"]
        assert math.isfinite(metrics["loss"]), record
        assert metrics["loss"] > 0, record
        assert 0 <= metrics["eval_accuracy"] <= 1, record
        assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"]), record
    digests = _digests_by_round(records)
    assert len(set(digests.values())) == 3, f"every round must change the model: {digests}"
    for client in clients:
        summary = client.summary()
        assert summary["client"] == client.name
        assert summary["rounds"] == digests, f"{client.name} disagrees with the server"
    assert "Traceback" not in server_log, server_log


@pytest.mark.timeout(150)
def test_client_joining_late_takes_part_from_a_later_round(
        server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """Three clients start the run; a fourth starts after round 1 has closed.

    One of the three is driven from here (`pacer`, the client library): round 2
    cannot close until it sends, so the fourth client deterministically
    registers while round 2 is open and joins from round 3."""
    server = server_factory(clients=3, rounds=3)
    with ParameterServerClient(server.address, timeout=60) as pacer:
        assert pacer.register("pacer").first_round == 1
        early = [client_factory(name, server) for name in ("early1", "early2")]
        _, state = pacer.get_model("pacer", 0)
        for client in early:  # round 1 opens once all three have registered
            match = server.wait_for_log(rf"client {client.name} registered, first round (\d+)",
                                        timeout=60)
            assert int(match.group(1)) == 1, match.group(0)
        ack = pacer.send_update("pacer", 1, state, num_examples=1, metrics={"loss": 1.0})
        assert (ack.round, ack.expected) == (1, 3)
        header, state = pacer.get_model("pacer", 1, timeout=60)  # round 2 is now open
        assert (header.round, header.num_updates) == (1, 3)

        late = client_factory("late", server)
        match = server.wait_for_log(r"client late registered, first round (\d+)", timeout=60)
        assert int(match.group(1)) == 3, match.group(0)

        for round, cohort in ((2, 3), (3, 4)):
            ack = pacer.send_update("pacer", round, state, num_examples=1,
                                    metrics={"loss": 1.0})
            assert (ack.round, ack.duplicate, ack.expected) == (round, False, cohort), ack
            header, state = pacer.get_model("pacer", round, timeout=60)
            assert (header.round, header.num_updates) == (round, cohort)

    for client in (*early, late):
        _check_exit(client.wait(), client.name, client.log())
    records = server.wait_for_rounds(3)
    assert [(r["round"], r["num_updates"]) for r in records] == [(1, 3), (2, 3), (3, 4)]
    assert records[2]["total_examples"] == 1 + 3 * 200
    digests = _digests_by_round(records)
    assert header.sha256.hex() == digests["3"]
    for client in early:
        assert client.summary()["rounds"] == digests, client.name
    assert late.summary()["rounds"] == {"3": digests["3"]}, "late must take part in round 3 only"
    server.assert_alive_or_finished()


def _run_demo(workdir: Path, logs: list[Path], stack: contextlib.ExitStack,
              ) -> subprocess.Popen[bytes]:
    command = processes.paramserver_command(
        "demo", "--clients", "2", "--rounds", "2", "--examples", "200", "--seed", "0",
        "--workdir", str(workdir))
    return stack.enter_context(running_group(command, workdir.with_suffix(".log"), logs))


def _final_digest(output: str) -> str:
    match = re.search(r"final model sha256: ([0-9a-f]{64})\b", output)
    assert match, f"no final digest in the demo's output:\n{output}"
    return match.group(1)


@pytest.mark.timeout(170)
def test_demo_runs_and_is_deterministic(tmp_path: Path, process_logs: list[Path],
                                        process_stack: contextlib.ExitStack) -> None:
    # Two runs with the same seed, side by side: each has its own server on its own port.
    workdirs = [tmp_path / "demo-a", tmp_path / "demo-b"]
    demos = [_run_demo(w, process_logs, process_stack) for w in workdirs]
    digests = []
    for workdir, demo in zip(workdirs, demos, strict=True):
        code = demo.wait(150)
        output = read_log(workdir.with_suffix(".log"))
        _check_exit(code, f"demo in {workdir}", output)
        assert "OK:" in output, output
        digest = _final_digest(output)
        log_lines = (workdir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in log_lines]
        assert [(r["round"], r["num_updates"]) for r in records] == [(1, 2), (2, 2)], records
        assert digest == records[-1]["sha256"]
        digests.append(digest)
    initial = codec.state_dict_digest(training.build_model("mlp", 0, 64, 10).state_dict()).hex()
    assert digests[0] != initial, "the demo did not train"
    assert digests[0] == digests[1], "two demo runs with the same seed differ"


def test_server_ready_file_and_graceful_stop(server_factory: ServerFactory) -> None:
    server: ServerProcess = server_factory()
    ready = json.loads((server.workdir / "ready.json").read_text())
    assert ready == {"port": server.port, "pid": server.process.pid}
    assert server.port > 0
    assert server.stop() == 0, server.log()
