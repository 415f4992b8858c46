"""The `paramserver` command as real processes: one-line errors and exit codes
for user mistakes, a client that gives up or is interrupted, a client that
finds its run finished, a server that exits by itself after its last round."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from paramserver import processes
from paramserver.client import ParameterServerClient

from .harness import ClientFactory, ServerFactory, read_log, running, wait_for

EXIT_TIMEOUT = 90.0  # a cold start on a busy machine; every process here ends by itself


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(processes.paramserver_command(*args), capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, stdin=subprocess.DEVNULL, cwd=cwd, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.timeout(200)
def test_unusable_state_dirs_and_ports_are_one_line_and_exit_2(
        tmp_path: Path, server_factory: ServerFactory) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    one_line_error(run("serve", "--port", "0", "--state-dir", str(a_file), cwd=tmp_path),
                   2, "cannot use", str(a_file))

    server = server_factory()  # holds its state dir and its port
    state = server.workdir / "state"
    one_line_error(run("serve", "--port", "0", "--state-dir", str(state), cwd=tmp_path),
                   2, "in use by another server")
    one_line_error(run("serve", "--port", str(server.port), "--state-dir",
                       str(tmp_path / "other"), cwd=tmp_path),
                   2, f"cannot listen on 127.0.0.1:{server.port}")
    server.stop()
    one_line_error(run("serve", "--port", "0", "--state-dir", str(state), "--model", "cnn",
                       cwd=tmp_path), 2, "holds another run", "--fresh")


@pytest.mark.timeout(120)
def test_a_client_with_no_server_gives_up_after_its_connect_timeout(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run("client", "c1", "--server", f"127.0.0.1:{port}", "--connect-timeout", "3",
                 cwd=tmp_path)
    one_line_error(result, 1, "UNAVAILABLE")
    retries = [line for line in result.stdout.splitlines() if "retry" in line]
    assert retries, result.stdout
    assert all(line.count("retry") == 1 for line in retries), "more than one line per retry"
    assert len(result.stdout.splitlines()) == len(retries), result.stdout


@pytest.mark.timeout(120)
def test_ctrl_c_of_a_client_is_exit_130_and_one_line(tmp_path: Path,
                                                     process_logs: list[Path]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = processes.paramserver_command("client", "c1", "--server", f"127.0.0.1:{port}",
                                            "--connect-timeout", "60")
    log = tmp_path / "client.log"
    with running(command, log, process_logs) as client:
        wait_for(lambda: "retry" in read_log(log) or None, EXIT_TIMEOUT,
                 "the client to retry the absent server")
        client.send_signal(signal.SIGINT)
        assert client.wait(EXIT_TIMEOUT) == 130, read_log(log)
    output = read_log(log)
    assert output.strip().splitlines()[-1] == "paramserver client: interrupted", output
    assert "Traceback" not in output, output


@pytest.mark.timeout(200)
def test_serve_exits_by_itself_after_its_last_round_and_late_clients_are_told(
        server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """The run ends once every client has the final model (one line: digest
    and place); a client that arrives after the end is told so (exit 3)."""
    server = server_factory("--linger", "120", clients=1, rounds=1)
    with ParameterServerClient(server.address, timeout=60) as watcher:
        first = client_factory("first", server)
        server.wait_for_log(r"client first registered", timeout=EXIT_TIMEOUT)
        # A second client registers once round 1 is open: it will be owed
        # the final model, which keeps the server serving after the end.
        assert watcher.register("watcher").first_round == 2
        assert first.wait(EXIT_TIMEOUT) == 0, first.log()
        server.wait_for_log(r"run finished after round 1", timeout=EXIT_TIMEOUT)
        late = client_factory("late", server)
        assert late.wait(EXIT_TIMEOUT) == 3, late.log()
        assert "has already finished all its 1 rounds" in late.log(), late.log()
        for name in ("watcher", "late"):  # everyone still owed the model fetches it
            header, _ = watcher.get_model(name, 1)
    assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()
    record = server.rounds()[-1]
    assert header.sha256.hex() == record["sha256"]
    summary = re.search(r"run finished: final global model of round 1, sha256 ([0-9a-f]{64}), "
                        r"in (\S+)", server.log())
    assert summary, server.log()
    assert summary.group(1) == record["sha256"]
    assert Path(summary.group(2)).is_file()


@pytest.mark.timeout(200)
def test_a_client_with_the_wrong_model_is_refused_and_stalls_nobody(
        server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    server = server_factory(clients=1, rounds=1)  # --model mlp
    wrong = client_factory("wrong", server, "--model", "cnn")
    assert wrong.wait(EXIT_TIMEOUT) == 1, wrong.log()
    assert "the client's model is not the server's" in wrong.log(), wrong.log()
    assert "Traceback" not in wrong.log()
    right = client_factory("right", server)
    assert right.wait(EXIT_TIMEOUT) == 0, right.log()
    assert [(r["round"], r["num_updates"]) for r in server.wait_for_rounds(1)] == [(1, 1)]


@pytest.mark.timeout(200)
def test_the_demo_keeps_its_logs(tmp_path: Path, process_logs: list[Path]) -> None:
    workdir = tmp_path / "demo"
    command = processes.paramserver_command(
        "demo", "--clients", "2", "--rounds", "1", "--examples", "100", "--workdir",
        str(workdir), "--streaming")
    log = tmp_path / "demo.log"
    with contextlib.ExitStack() as stack:
        demo = stack.enter_context(running(command, log, process_logs))
        assert demo.wait(150) == 0, read_log(log)
    output = read_log(log)
    assert f"logs in {workdir}" in output
    for name in ("server.log", "client1.log", "client2.log", "metrics.jsonl"):
        assert (workdir / name).is_file(), name
