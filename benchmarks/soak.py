"""Soak for leaks: many rounds against a real server process, measuring its
RSS slope after warm-up, its thread count and its open file descriptors.

    .venv/bin/python benchmarks/soak.py --rounds 1000 --clients 4

Clients run as threads in this process (the server cannot tell) and do no
training: each sends the global model plus a small deterministic change, so the
server's own costs dominate. Bounded: stops after --rounds or --max-seconds.
Prints a JSON summary; exits 1 if a target is missed (slope >= 16 KiB/round,
or threads / descriptors not flat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil
import torch

from paramserver import processes
from paramserver.client import ParameterServerClient

SLOPE_TARGET = 16 * 1024  # bytes per round


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def run_client(address: str, name: str, rounds: int, deadline: float,
               errors: list[str]) -> None:
    try:
        with ParameterServerClient(address, timeout=60) as client:
            reg = client.register(name)
            _, state = client.get_model(reg.client_id, reg.first_round - 1)
            for round in range(reg.first_round, rounds + 1):
                if time.monotonic() > deadline:
                    errors.append(f"{name}: out of time at round {round}")
                    return
                step = 1e-3 * (zlib.crc32(name.encode()) % 7)
                update = {k: v + step if v.is_floating_point() else v for k, v in state.items()}
                client.send_update(reg.client_id, round, update, 100)
                _, state = client.get_model(reg.client_id, round)
    except Exception as error:  # reported, not swallowed: the run fails
        errors.append(f"{name}: {error!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=1200)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "wb") as log:
        ready = Path(tmp) / "ready"
        server = processes.spawn(processes.paramserver_command(
            "--log-level", "WARNING", "serve", "--port", "0", "--clients", str(args.clients),
            "--rounds", str(args.rounds), "--eval-examples", "0", "--ready-file", str(ready),
            "--round-log", str(Path(tmp) / "rounds.jsonl"), "--state-dir",
            str(Path(tmp) / "state")), log)
        try:
            port = processes.wait_for_ready_file(ready, server, timeout=60)
            samples = sample_while_running(server, Path(tmp) / "rounds.jsonl", args, port,
                                           deadline)
        finally:
            processes.stop(server)
    return report(samples, args)


def sample_while_running(server: subprocess.Popen[bytes], round_log: Path,
                         args: argparse.Namespace, port: int,
                         deadline: float) -> dict[str, list[float]]:
    proc = psutil.Process(server.pid)
    errors: list[str] = []
    address = f"127.0.0.1:{port}"
    threads = [threading.Thread(target=run_client, args=(
        address, f"soak{i}", args.rounds, deadline, errors)) for i in range(args.clients)]
    for t in threads:
        t.start()
    samples: dict[str, list[float]] = {"round": [], "rss": [], "threads": [], "fds": []}
    last = -1
    while time.monotonic() < deadline:
        running = any(t.is_alive() for t in threads)
        done = len(round_log.read_text().splitlines()) if round_log.exists() else 0
        if done != last:
            samples["round"].append(done)
            samples["rss"].append(proc.memory_info().rss)
            samples["threads"].append(proc.num_threads())
            samples["fds"].append(proc.num_fds())
            last = done
        if not running:  # one last sample after the clients finished, then stop
            break
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    samples["errors"] = errors  # type: ignore[assignment]
    return samples


def report(samples: dict[str, list[float]], args: argparse.Namespace) -> int:
    warm = [i for i, r in enumerate(samples["round"]) if r >= args.warmup]
    xs = [samples["round"][i] for i in warm]
    # Slopes over the rounds after warm-up. Flat: less than one thread or
    # descriptor gained per 200 rounds (a leak of one per round has slope 1;
    # momentary update files make noise around 0).
    slopes = {k: slope(xs, [samples[k][i] for i in warm]) if len(xs) > 2 else None
              for k in ("rss", "threads", "fds")}
    flat = all(slopes[k] is not None and abs(slopes[k] or 0) < 1 / 200
               for k in ("threads", "fds"))
    rss_slope = slopes["rss"]
    ok = (not samples["errors"] and max(samples["round"], default=0) >= args.rounds and flat
          and rss_slope is not None and rss_slope < SLOPE_TARGET)
    summary = {
        "rounds_completed": max(samples["round"], default=0),
        "clients": args.clients,
        "warmup_rounds": args.warmup,
        "rss_slope_bytes_per_round": rss_slope,
        "rss_mb_after_warmup_first_last": [samples["rss"][warm[0]] / 2**20,
                                           samples["rss"][warm[-1]] / 2**20] if warm else None,
        "threads_range_after_warmup": _range(samples["threads"], warm),
        "threads_slope_per_round": slopes["threads"],
        "fds_range_after_warmup": _range(samples["fds"], warm),
        "fds_slope_per_round": slopes["fds"],
        "errors": samples["errors"],
        "targets_met": ok,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print("OK" if ok else "TARGET MISSED")
    return 0 if ok else 1


def _range(values: list[float], indices: list[int]) -> list[float] | None:
    picked = [values[i] for i in indices]
    return [min(picked), max(picked)] if picked else None


if __name__ == "__main__":
    sys.exit(main())
