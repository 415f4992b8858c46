"""Crash points for chaos tests: `PARAMSERVER_TEST_CRASH_AT=<point>:<round>`
makes the process SIGKILL itself at that point of that round, as `kill -9`
would, but at an exact place. Unset (always, outside tests) it costs one dict
lookup per call. Imports only the standard library.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading

from paramserver.errors import ParamServerError

CRASH_ENV = "PARAMSERVER_TEST_CRASH_AT"
SERVER_POINTS = ("before_ack", "after_ack", "during_aggregation", "during_model_write",
                 "after_publish")
CLIENT_POINTS = ("client_before_upload", "client_during_upload", "client_after_upload")
SECURE_CLIENT_POINTS = ("client_after_masked",)  # reached only in a --secagg round
ALL_POINTS = SERVER_POINTS + CLIENT_POINTS + SECURE_CLIENT_POINTS

log = logging.getLogger("paramserver.faults")


@functools.cache
def crash_point() -> tuple[str, int] | None:
    """The configured crash point, read once. Raises ParamServerError if malformed."""
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    point, _, round = value.partition(":")
    if point not in ALL_POINTS or not round.isdigit():
        raise ParamServerError(
            f"{CRASH_ENV}={value!r}: expected <point>:<round> with a point from "
            f"{ALL_POINTS}")
    log.warning("test build: will SIGKILL itself at %s of round %s", point, round)
    return point, int(round)


def is_armed(point: str, round: int) -> bool:
    return crash_point() == (point, round)


def maybe_crash(point: str, round: int) -> None:
    """SIGKILLs this process if `point` of `round` is the configured one."""
    if is_armed(point, round):
        kill_self()


_pending = threading.Event()


def crash_at_next_call(point: str, round: int) -> None:
    """If `point` of `round` is configured, SIGKILL at the next `next_call()`:
    for "after an acknowledgement", which is only surely delivered once the
    peer has made another call."""
    if is_armed(point, round):
        _pending.set()


def next_call() -> None:
    if _pending.is_set():
        kill_self()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
