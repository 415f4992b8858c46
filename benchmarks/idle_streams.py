"""How long the health check and a registration take while 300 upload streams
that never send a message are held open (issue 12's attack), against the same
calls on the same server before the attack: side by side, in one run.

A real `paramserver serve` process on 127.0.0.1:0, with enrolled tokens
(`--auth tokens`: the attacker holds one client's token; its streams past
--max-streams-per-client are refused at once) or without authentication
(`--auth none`: the streams past the upload cap are refused). Per phase it
times `--samples` health checks and `--samples` registrations of an enrolled
client (each a new channel, as a new caller would), and prints the medians,
the maxima and the ratio attack / before. The streams held are cancelled by
the watchdog after --stream-idle-timeout; the benchmark holds them for the
whole measurement (the timeout is set longer than it lasts).

    .venv/bin/python benchmarks/idle_streams.py                 # both modes
    .venv/bin/python benchmarks/idle_streams.py --auth tokens --samples 50

Never asserts a time: the machine is shared; the ratios are side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver import processes, wire
from paramserver.client import ParameterServerClient
from paramserver.security import ClientCredentials, open_channel
from paramserver.tokens import TokenStore

IDLE_STREAMS = 300
IDLE_TIMEOUT = 600  # seconds: longer than the measurement, so the streams stay held


@contextlib.contextmanager
def server(workdir: Path, auth: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A serve process; its address and the enrolled clients' tokens."""
    state = workdir / "state"
    state.mkdir(parents=True)
    tokens = {}
    if auth == "tokens":
        store = TokenStore(state)
        tokens = {name: store.add(name) for name in ("alice", "mallory")}
    ready = workdir / "ready.json"
    command = processes.paramserver_command(
        "serve", "--port", "0", "--clients", "2", "--capacity", "64", "--state-dir", str(state),
        "--ready-file", str(ready), "--stream-idle-timeout", str(IDLE_TIMEOUT), "--no-fsync")
    with open(workdir / "server.log", "wb") as log:
        process = processes.spawn(command, log)
    try:
        port = processes.wait_for_ready_file(ready, process, timeout=120)
        yield f"127.0.0.1:{port}", tokens
    finally:
        processes.stop(process)


def credentials(token: str | None) -> ClientCredentials | None:
    return ClientCredentials(token=token) if token else None


def timed(call: Callable[[], object], samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def health(address: str) -> None:
    with contextlib.closing(open_channel(address, None, [])) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def register(address: str, token: str | None) -> None:
    with ParameterServerClient(address, timeout=60, credentials=credentials(token)) as client:
        client.register("alice")


@contextlib.contextmanager
def idle_uploads(address: str, token: str | None) -> Iterator[dict[str, int]]:
    """IDLE_STREAMS SendUpdate calls that never send a message; yields the
    count of each status code so far (the held ones are still running)."""
    channel = open_channel(address, credentials(token), [])
    never = threading.Event()
    path = wire.method_path("SendUpdate")
    call: Any = channel.stream_unary(path)

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    futures = [call.future(nothing(), timeout=IDLE_TIMEOUT) for _ in range(IDLE_STREAMS)]
    codes: dict[str, int] = {}

    def refused() -> int:
        return sum(1 for f in futures if f.done())

    # The refusals past the limits come at once: wait until their count has
    # not moved for a second (at most two minutes).
    deadline, last, still = time.monotonic() + 120, -1, 0
    while time.monotonic() < deadline and still < 20:
        now = refused()
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.05)
    for future in futures:
        if future.done():
            code = future.exception().code().name if future.exception() else "OK"
            codes[code] = codes.get(code, 0) + 1
    codes["held"] = IDLE_STREAMS - refused()
    try:
        yield codes
    finally:
        never.set()
        for future in futures:
            future.cancel()
        channel.close()


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times)}


def measure(auth: str, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp), auth) as (address, tokens):
        alice, mallory = tokens.get("alice"), tokens.get("mallory")
        timed(lambda: health(address), samples)  # warm-up: first calls pay for set-up
        timed(lambda: register(address, alice), samples)
        before = {"health": timed(lambda: health(address), samples),
                  "register": timed(lambda: register(address, alice), samples)}
        with idle_uploads(address, mallory) as codes:
            during = {"health": timed(lambda: health(address), samples),
                      "register": timed(lambda: register(address, alice), samples)}
    result: dict[str, Any] = {"auth": auth, "idle_streams": IDLE_STREAMS, "codes": codes}
    for call in ("health", "register"):
        b, d = summary(before[call]), summary(during[call])
        result[call] = {"before": b, "during": d,
                        "ratio": d["median_ms"] / b["median_ms"]}
        print(f"{auth:6s} {call:8s}: before {b['median_ms']:7.2f} ms (max {b['max_ms']:7.2f}), "
              f"with {IDLE_STREAMS} idle streams {d['median_ms']:7.2f} ms "
              f"(max {d['max_ms']:7.2f}): {result[call]['ratio']:.2f}x", flush=True)
    print(f"{auth:6s} streams: {codes}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--auth", choices=["tokens", "none", "both"], default="both")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = ["tokens", "none"] if args.auth == "both" else [args.auth]
    results = [measure(mode, args.samples) for mode in modes]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
