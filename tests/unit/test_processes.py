import subprocess
import sys
from pathlib import Path

import pytest

from paramserver import processes


def test_ready_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ready"
    processes.write_ready_file(path, 12345)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert processes.wait_for_ready_file(path, child, timeout=5) == 12345
        assert [p.name for p in tmp_path.iterdir()] == ["ready"]  # no temp file left
    finally:
        assert processes.stop(child) != 0  # it was terminated, not finished


def test_waiting_fails_early_when_the_child_dies(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(RuntimeError, match="exited with 3"):
            processes.wait_for_ready_file(tmp_path / "never", child, timeout=30)
    finally:
        processes.stop(child)


def test_waiting_times_out(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(TimeoutError):
            processes.wait_for_ready_file(tmp_path / "never", child, timeout=0.2)
    finally:
        processes.stop(child)
