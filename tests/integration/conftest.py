"""Fixtures that run paramserver as real processes (see harness.py).

When a test fails, the logs of every process it started are attached to its
failure report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from .harness import ClientFactory, ServerFactory, read_log

# The log files of the processes a test started, attached to its report on failure.
LOGS_KEY = pytest.StashKey[list[Path]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for path in item.stash.get(LOGS_KEY, []):
            report.sections.append((f"paramserver log {path}", read_log(path)))
    return report


@pytest.fixture
def process_logs(request: pytest.FixtureRequest) -> list[Path]:
    """The log files of this test's processes (attached to its report if it fails)."""
    logs: list[Path] = request.node.stash.setdefault(LOGS_KEY, [])
    return logs


@pytest.fixture
def process_stack() -> Iterator[contextlib.ExitStack]:
    """Every process (and channel) a test opens is entered here and closed at teardown."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def server_factory(process_stack: contextlib.ExitStack, tmp_path: Path,
                   process_logs: list[Path]) -> ServerFactory:
    return ServerFactory(process_stack, tmp_path, process_logs)


@pytest.fixture
def client_factory(process_stack: contextlib.ExitStack, tmp_path: Path,
                   process_logs: list[Path]) -> ClientFactory:
    return ClientFactory(process_stack, tmp_path, process_logs)
