"""Starting and stopping real paramserver processes: the ready-file handshake.

A server binds port 0 and writes its real port to a ready file atomically
(temp file, then os.replace), so a reader never sees half a file. The parent
polls for it with a deadline and fails early if the child has died. Used by the
demo and by the integration tests; no grpc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def write_ready_file(path: Path, port: int) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(temp, path)


def wait_for_ready_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> int:
    """The port the process wrote. Raises RuntimeError if the process exits
    first, TimeoutError if it writes nothing within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(json.loads(path.read_text())["port"])
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before it was ready")
        time.sleep(0.02)
    raise TimeoutError(f"no ready file {path} after {timeout}s")


def paramserver_command(*args: str) -> list[str]:
    # -u: unbuffered, so logs are complete even if the child is killed.
    return [sys.executable, "-u", "-m", "paramserver", *args]


def spawn(args: list[str], log: IO[bytes] | None, env: dict[str, str] | None = None,
          ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, env=env)


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; always reaps. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
