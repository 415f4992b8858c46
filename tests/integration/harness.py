"""Real paramserver processes for the integration tests.

Every process is a real `python -u -m paramserver ...` subprocess bound to
127.0.0.1 port 0; the test learns the port from the server's ready file. Each
process is started by a context manager entered on the test's ExitStack, so it
is stopped (SIGTERM, then SIGKILL) and reaped when the test ends, whatever
happened. Logs go to files under tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from paramserver import processes

T = TypeVar("T")

HOST = "127.0.0.1"
READY_TIMEOUT = 60.0  # a cold torch import on a busy 2-core machine is slow
LOG_TAIL_CHARS = 20_000


def read_log(path: Path, tail: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<no log file {path}>"
    return text if len(text) <= tail else f"<...{len(text) - tail} chars cut...>\n{text[-tail:]}"


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.02) -> T:
    """Polls `predicate` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes -------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A running `paramserver serve`."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    round_log_path: Path
    spool_dir: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log(self) -> str:
        return read_log(self.log_path)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """What the server has logged since the log was `offset` bytes long."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def rounds(self) -> list[dict[str, Any]]:
        """The round log: one record per published round, in order."""
        if not self.round_log_path.exists():
            return []
        text = self.round_log_path.read_text()
        complete = text[:text.rfind("\n") + 1]  # a record being appended is not read yet
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for_rounds(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The round log once it has `count` records. (A client can see a round's
        model a moment before the server has appended its record.)"""
        def ready() -> list[dict[str, Any]] | None:
            rounds = self.rounds()
            if len(rounds) >= count:  # a finished server may have exited by now
                return rounds
            self._check_alive()
            return None

        return wait_for(ready, timeout, f"{count} records in {self.round_log_path}")

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of the regex `pattern` in the server's log."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            match = regex.search(self.log())
            if match is None:
                self._check_alive()
            return match

        return wait_for(found, timeout, f"/{pattern}/ in {self.log_path}")

    def assert_alive(self) -> None:
        self._check_alive()

    def assert_alive_or_finished(self) -> None:
        """Serving, or exited 0 by itself after the last round."""
        if self.process.poll() not in (None, 0):
            raise AssertionError(f"server exited with {self.process.returncode}\n{self.log()}")

    def spool_files(self) -> list[Path]:
        """Update files, committed or partial (not the round bookkeeping files)."""
        return sorted(p for p in self.spool_dir.rglob("*")
                      if p.is_file() and (p.suffix == ".update" or p.name.endswith(".part")))

    def stop(self) -> int:
        """SIGTERM (graceful), SIGKILL after 10 s; returns the exit code."""
        return processes.stop(self.process)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}\n{self.log()}")


@dataclass
class ClientProcess:
    """A running `paramserver client NAME`."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    summary_path: Path

    def log(self) -> str:
        return read_log(self.log_path)

    def wait(self, timeout: float = 90.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"client {self.name} still running after {timeout}s\n{self.log()}") from None

    def summary(self) -> dict[str, Any]:
        assert self.summary_path.exists(), f"{self.name} wrote no summary\n{self.log()}"
        result: dict[str, Any] = json.loads(self.summary_path.read_text())
        return result


@contextlib.contextmanager
def running(command: list[str], log_path: Path, logs: list[Path],
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess with stdout and stderr in `log_path` (appended to, so a
    restarted server keeps one log); stopped and reaped on exit. `env` adds to
    the environment."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logs.append(log_path)
    with open(log_path, "ab") as log:
        process = processes.spawn(command, log, env={**os.environ, **env} if env else None)
    try:
        yield process
    finally:
        processes.stop(process)


@contextlib.contextmanager
def running_group(command: list[str], log_path: Path, logs: list[Path],
                  ) -> Iterator[subprocess.Popen[bytes]]:
    """Like `running`, for a command that starts processes of its own (the demo):
    it runs in a new session, and whatever of its process group is left when it
    has been stopped is killed too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logs.append(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            # SIGINT first: the demo stops its own children on KeyboardInterrupt.
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
        processes.stop(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group is ours: pgid == its pid


@dataclass
class ServerFactory:
    """`server_factory(*extra_args, clients=2, rounds=0, eval_examples=0)`."""

    stack: contextlib.ExitStack
    tmp_path: Path
    logs: list[Path]
    started: list[ServerProcess] = field(default_factory=list)
    _count: int = 0

    def __call__(self, *extra: str, clients: int = 2, rounds: int = 0,
                 eval_examples: int = 0, state_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> ServerProcess:
        """Starts a server; pass the `state_dir` of an earlier one to resume it."""
        self._count += 1
        workdir = self.tmp_path / f"server{self._count}"
        workdir.mkdir(parents=True)
        ready, round_log = workdir / "ready.json", workdir / "rounds.jsonl"
        state_dir = state_dir or workdir / "state"
        spool = state_dir / "updates"
        command = processes.paramserver_command(
            "serve", "--host", HOST, "--port", "0", "--ready-file", str(ready),
            "--round-log", str(round_log), "--state-dir", str(state_dir),
            "--clients", str(clients), "--rounds", str(rounds),
            "--eval-examples", str(eval_examples), *extra)
        log_path = workdir / "server.log"
        process = self.stack.enter_context(running(command, log_path, self.logs, env))
        try:
            port = processes.wait_for_ready_file(ready, process, timeout=READY_TIMEOUT)
        except (RuntimeError, TimeoutError) as error:
            raise AssertionError(f"server not ready: {error}\n{read_log(log_path)}") from None
        server = ServerProcess(process, port, workdir, log_path, round_log, spool)
        self.started.append(server)
        return server


@dataclass
class ClientFactory:
    """`client_factory(name, server, *extra_args, examples=200)`."""

    stack: contextlib.ExitStack
    tmp_path: Path
    logs: list[Path]

    def __call__(self, name: str, server: ServerProcess | str, *extra: str,
                 examples: int = 200, env: dict[str, str] | None = None) -> ClientProcess:
        address = server if isinstance(server, str) else server.address
        workdir = self.tmp_path / "clients"
        summary, log_path = workdir / f"{name}.json", workdir / f"{name}.log"
        command = processes.paramserver_command(
            "client", name, "--server", address, "--summary-file", str(summary),
            "--examples", str(examples), "--round-wait", "90", *extra)
        process = self.stack.enter_context(running(command, log_path, self.logs, env))
        return ClientProcess(name, process, log_path, summary)
