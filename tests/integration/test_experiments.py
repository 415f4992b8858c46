"""Experiments as a user runs them: the README's example (the same text as
examples/own_cnn_digits.py, run as written), your own task given to the
command line as module:function, logs as JSON, and the results commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paramserver import processes

from .harness import ClientFactory, ServerFactory

ROOT = Path(__file__).resolve().parents[2]
EXIT_TIMEOUT = 150.0


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: examples/own_cnn_digits.py -->\n```python\n(.*?)```",
                      text, re.S)
    assert match, "the README has no example block"
    return match.group(1)


def test_the_readme_example_is_the_example_file() -> None:
    assert readme_example() == (ROOT / "examples" / "own_cnn_digits.py").read_text()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")
                                           if p.name != "digits_experiments.py"))
def test_every_example_runs(example: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"final model sha256: [0-9a-f]{64}", result.stdout), result.stdout


@pytest.mark.timeout(300)
def test_the_digits_experiments_script_runs(tmp_path: Path) -> None:
    """docs/experiments.md's IID run and its most skewed one, at their full
    size: IID reaches 95% of the centralized accuracy, Dirichlet(0.1) 90%."""
    out = tmp_path / "experiments"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_experiments.py"),
                             "--out", str(out), "--runs", "iid", "dirichlet-0.1"],
                            capture_output=True, text=True,
                            timeout=EXIT_TIMEOUT * 2, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["iid"][2] >= 0.95 * summary["centralized"], summary
    assert summary["runs"]["dirichlet-0.1"][2] >= 0.90 * summary["centralized"], summary
    assert (out / "digits.png").read_bytes()[:4] == b"\x89PNG"


USER_TASK = '''
from torch import nn
import paramserver as ps


def tiny(ctx: ps.TaskContext) -> ps.Task:
    digits = ps.data.digits()
    model = lambda: nn.Sequential(nn.Linear(64, 10))
    if ctx.client is None:
        return ps.Task(model=model, train_data=digits.train, test_data=digits.test)
    parts = ps.partition.iid(len(digits.train), ctx.clients, ctx.seed)
    return ps.Task(model=model, train_data=ps.data.subset(digits.train, parts[ctx.index]))
'''


@pytest.mark.timeout(200)
def test_your_own_task_from_the_command_line(server_factory: ServerFactory,
                                             client_factory: ClientFactory, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tasks.py").write_text(USER_TASK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = server_factory("--task", "my_tasks:tiny", "--eval-examples", "1", clients=2,
                            rounds=2)
    clients = [client_factory(f"c{i}", server, "--task", "my_tasks:tiny", "--index", str(i),
                              "--num-clients", "2") for i in range(2)]
    for client in clients:
        assert client.wait(EXIT_TIMEOUT) == 0, client.log()
    records = server.wait_for_rounds(2)
    assert [r["num_updates"] for r in records] == [2, 2]
    assert 0 <= records[-1]["metrics"]["eval_accuracy"] <= 1


@pytest.mark.timeout(200)
def test_logs_as_json_lines_in_a_file(server_factory: ServerFactory,
                                      client_factory: ClientFactory, tmp_path: Path) -> None:
    log_file = tmp_path / "server.jsonl"
    server = server_factory("--log-format", "json", "--log-file", str(log_file), clients=1,
                            rounds=1)
    client = client_factory("solo", server)
    assert client.wait(EXIT_TIMEOUT) == 0, client.log()
    server.wait_for_rounds(1)
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(e["message"].startswith("round 1 closed") for e in entries)
    assert all({"time", "logger", "level", "message"} <= e.keys() for e in entries)


def test_export_and_plot_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    for args in (["export", str(tmp_path), str(tmp_path / "out")],
                 ["plot", str(tmp_path / "none")]):
        result = subprocess.run(processes.paramserver_command(*args), capture_output=True,
                                text=True, timeout=EXIT_TIMEOUT, check=False)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "not a" in result.stderr
