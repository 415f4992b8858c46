"""Where an MLP round's CPU goes: server and load generator, user and system
time, per client per round, for the floor and paramserver (durable and
--no-fsync), side by side in one run; plus what the integrity checks alone
cost (SHA-256 of one payload, done three times per client per round).

    .venv/bin/python benchmarks/cpu_split.py --clients 8 32 --rounds 100

Both processes share the machine's cores, so a round can be no shorter than
(server CPU + load generator CPU) / cores: these figures say which side and
which kind of work (user: Python, protobuf, hashing; system: syscalls, fsync,
page faults, futexes) makes paramserver slower than the floor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from workload import model_numel, round_periods, tensor_bytes  # noqa: E402


def measure(system: str, clients: int, rounds: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    with bench.started_server(system, "mlp", clients, workdir) as (server, address):
        if system == "floor":
            load = [sys.executable, str(HERE / "floor.py"), "load", "--server", address,
                    "--clients", str(clients), "--rounds", str(rounds), "--model", "mlp"]
        else:
            load = [sys.executable, str(HERE / "bench.py"), "load-paramserver", "--server",
                    address, "--clients", str(clients), "--rounds", str(rounds)]
        before = psutil.Process(server.pid).cpu_times()
        # The load generator is the only child reaped in between (the server
        # is reaped later), so the children's usage grows by exactly its own.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(load, capture_output=True, text=True, timeout=1800)
        grown = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = psutil.Process(server.pid).cpu_times()
    if out.returncode != 0:
        raise RuntimeError(f"{system} load failed: {out.stderr[-2000:]}")
    load_user = grown.ru_utime - children.ru_utime
    load_system = grown.ru_stime - children.ru_stime
    result = json.loads(out.stdout.strip().splitlines()[-1])
    periods = result.get("round_seconds") or round_periods(result["done"])
    per = 1000 / (clients * rounds)  # ms per client per round
    # The load generator's CPU includes its start-up (imports): reported apart.
    return {"round_ms": statistics.median(periods) * 1000,
            "server_user": (after.user - before.user) * per,
            "server_system": (after.system - before.system) * per,
            "load_user": load_user * per, "load_system": load_system * per}


def startup_cpu() -> float:
    """CPU seconds a load generator spends starting (imports), to subtract."""
    usage = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import torch, grpc, paramserver.client"],
                       check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        usage.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(usage)


MLP_PAYLOAD_BYTES = model_numel("mlp") * 4


def hash_cost_ms() -> float:
    payload = tensor_bytes(torch.ones(model_numel("mlp")))
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(100):
            hashlib.sha256(payload).digest()
        runs.append((time.perf_counter() - started) * 10)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    startup = startup_cpu()
    sha = hash_cost_ms()
    print(f"SHA-256 of one MLP payload ({MLP_PAYLOAD_BYTES} bytes): {sha:.3f} ms; "
          f"load generator start-up: {startup:.2f} s CPU", flush=True)
    print(f"{'system':22} {'N':>3} {'round ms':>9}   per client per round, ms CPU: "
          f"{'server user':>11} {'server sys':>10} {'load user':>9} {'load sys':>8} {'total':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for system in ("floor", "paramserver", "paramserver-nofsync"):
                r = measure(system, n, args.rounds, Path(tmp) / f"{system}-{n}")
                r["load_user"] -= startup * 1000 / (n * args.rounds)
                total = r["server_user"] + r["server_system"] + r["load_user"] + r["load_system"]
                rows.append({"system": system, "clients": n, **r, "total": total})
                print(f"{system:22} {n:>3} {r['round_ms']:>9.1f}   {'':30}"
                      f"{r['server_user']:>11.2f} {r['server_system']:>10.2f} "
                      f"{r['load_user']:>9.2f} {r['load_system']:>8.2f} {total:>6.2f}",
                      flush=True)
    print(json.dumps({"sha256_ms": sha, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
