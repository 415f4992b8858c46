"""Side-by-side benchmark: paramserver, the hand-written floor (floor.py) and
Flower (flower_bench.py, in its own venv), same model, same N, same local work,
real processes on loopback, in one run. Prints ratios with medians and spread,
writes JSON and a PNG chart.

    make bench                          # everything (Flower is set up on first use)
    .venv/bin/python benchmarks/bench.py --quick      # MLP at N=2,8 only, no Flower

Never asserts an absolute time: the machine is shared; only ratios measured
side by side mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import round_periods  # noqa: E402

from paramserver import processes  # noqa: E402
from paramserver.client import ParameterServerClient  # noqa: E402

RESULTS = HERE / "results"


# -- the paramserver load generator (runs as its own process) ------------------------


def load_paramserver(server: str, clients: int, rounds: int) -> list[float]:
    done: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            with ParameterServerClient(server, timeout=600) as c:
                reg = c.register(f"c{i:04d}")
                _, model = c.get_model(reg.client_id, reg.model_round)
                for round in range(reg.first_round, reg.first_round + rounds):
                    update = {k: v + 0.001 for k, v in model.items()}
                    c.send_update(reg.client_id, round, update, 100)
                    _, model = c.get_model(reg.client_id, round)
                    done[i].append(time.perf_counter())
        except Exception as error:
            errors.append(f"c{i}: {error!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[:3])
    return round_periods(done)


# -- running one system ------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set, exact (no sampling)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run_system(system: str, model: str, clients: int, rounds: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    if system.startswith("flower"):
        out = subprocess.run([sys.executable, str(HERE / "flower_bench.py"), "--clients",
                              str(clients), "--rounds", str(rounds), "--model", model],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"flower failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # Periods between round ends: the same definition as for the others.
        return {"round_seconds": result["round_periods_seconds"],
                "server_peak_rss": result.get("server_peak_rss_bytes")}
    ready = workdir / "ready.json"
    if system == "floor":
        serve = [sys.executable, str(HERE / "floor.py"), "serve", "--clients", str(clients),
                 "--ready-file", str(ready)]
    else:
        serve = processes.paramserver_command(
            "--log-level", "WARNING", "serve", "--port", "0", "--clients", str(clients),
            "--rounds", "0", "--model", model, "--eval-examples", "0", "--ready-file",
            str(ready), "--state-dir", str(workdir / "state"),
            "--capacity", str(max(256, clients)),
            *(["--no-fsync"] if system == "paramserver-nofsync" else []))
    with open(workdir / "server.log", "wb") as log:
        server = processes.spawn(serve, log)
    try:
        port = processes.wait_for_ready_file(ready, server, timeout=120)
        address = f"127.0.0.1:{port}"
        if system == "floor":
            load = [sys.executable, str(HERE / "floor.py"), "load", "--server", address,
                    "--clients", str(clients), "--rounds", str(rounds), "--model", model]
        else:
            load = [sys.executable, str(HERE / "bench.py"), "load-paramserver", "--server",
                    address, "--clients", str(clients), "--rounds", str(rounds)]
        out = subprocess.run(load, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"{system} load failed: {out.stderr[-2000:]}")
        periods = json.loads(out.stdout.strip().splitlines()[-1])["round_seconds"]
        return {"round_seconds": periods, "server_peak_rss": peak_rss(server.pid)}
    finally:
        processes.stop(server)


def summarise(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "n": len(ordered)}


# -- scenarios -------------------------------------------------------------------------


def scenario_rounds(model: str, clients: int, rounds: int, systems: list[str],
                    workdir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "clients": clients, "systems": {}}
    for system in systems:
        started = time.monotonic()
        try:
            result = run_system(system, model, clients, rounds, workdir / f"{system}-{clients}")
        except Exception as error:  # recorded, and the run goes on
            row["systems"][system] = {"error": str(error)[:500]}
            print(f"  {system}: FAILED {str(error)[:200]}", flush=True)
            continue
        result["round"] = summarise(result["round_seconds"])
        result["wall_seconds"] = time.monotonic() - started
        row["systems"][system] = result
        r = result["round"]
        print(f"  {system:22} N={clients:<3} round median {r['median'] * 1000:8.1f} ms"
              f" (p25 {r['p25'] * 1000:.1f}, p75 {r['p75'] * 1000:.1f})"
              f"  server peak RSS {(result['server_peak_rss'] or 0) / 2**20:7.0f} MiB", flush=True)
    base = row["systems"].get("paramserver", {}).get("round", {}).get("median")
    row["ratios"] = {
        f"paramserver/{s}": base / r["round"]["median"]
        for s, r in row["systems"].items() if s != "paramserver" and "round" in r and base
    }
    for name, ratio in row["ratios"].items():
        print(f"  ratio {name}: {ratio:.2f}x", flush=True)
    return row


def aggregation_vs_memcpy(model_bytes: int, clients: int) -> dict[str, Any]:
    """Aggregation throughput (bytes of updates folded per second) against a
    memcpy of the same bytes, in this process, side by side."""
    from paramserver import codec
    from paramserver.spool import Spool, aggregate

    numel = model_bytes // 4
    sd = {"w": torch.randn(numel)}
    specs = codec.spec_of(sd)
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp))
        updates = []
        for i in range(clients):
            header = codec.UpdateHeader(f"c{i}", 1, 1, specs, codec.state_dict_digest(sd))
            writer = spool.writer(header)
            writer.write(b"".join(codec.payload_views(sd)))
            writer.seal()
            updates.append(writer.commit())
        aggregate(specs, updates)  # warm the page cache
        agg, copy = [], []
        source = bytearray(model_bytes)
        for _ in range(5):
            t = time.perf_counter()
            aggregate(specs, updates)
            agg.append(model_bytes * clients / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(clients):
                bytearray(source)
            copy.append(model_bytes * clients / (time.perf_counter() - t))
    result = {"model_bytes": model_bytes, "clients": clients,
              "aggregation_bytes_per_s": statistics.median(agg),
              "memcpy_bytes_per_s": statistics.median(copy)}
    result["ratio"] = result["aggregation_bytes_per_s"] / result["memcpy_bytes_per_s"]
    print(f"  aggregation {result['aggregation_bytes_per_s'] / 1e9:.2f} GB/s vs memcpy "
          f"{result['memcpy_bytes_per_s'] / 1e9:.2f} GB/s: {result['ratio']:.2f}x", flush=True)
    return result


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", flush=True)
        return
    rows = [r for r in rows if r.get("model") == "mlp"]
    systems = sorted({s for r in rows for s in r["systems"] if "round" in r["systems"][s]})
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in systems:
        xs = [r["clients"] for r in rows if "round" in r["systems"].get(system, {})]
        ys = [r["systems"][system]["round"]["median"] * 1000 for r in rows
              if "round" in r["systems"].get(system, {})]
        ax.plot(xs, ys, marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients per round")
    ax.set_ylabel("round time, median (ms)")
    ax.set_title("MLP 784-128-10, near-zero local work, loopback, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "load-paramserver":
        parser = argparse.ArgumentParser()
        parser.add_argument("command")
        parser.add_argument("--server", required=True)
        parser.add_argument("--clients", type=int, required=True)
        parser.add_argument("--rounds", type=int, required=True)
        args = parser.parse_args()
        torch.set_num_threads(1)
        print(json.dumps({"round_seconds": load_paramserver(args.server, args.clients,
                                                           args.rounds)}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="MLP at N=2,8; no Flower")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, nargs="*", default=[2, 8, 32, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    flower = not (args.quick or args.no_flower)
    if flower:
        subprocess.run([sys.executable, str(HERE / "flower_bench.py"), "--setup"], check=True)
    systems = ["paramserver", "paramserver-nofsync", "floor"]
    systems += ["flower-legacy"] if flower else []
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                "memory_gib": psutil.virtual_memory().total / 2**30},
                    "rows": []}
    clients = [2, 8] if args.quick else args.clients
    with tempfile.TemporaryDirectory() as tmp:
        for n in clients:
            print(f"MLP, N={n}", flush=True)
            report["rows"].append(scenario_rounds("mlp", n, args.rounds, systems, Path(tmp)))
        if not args.quick:
            for n in (4, 64):
                print(f"100 MB model, N={n}", flush=True)
                big_systems = systems if n == 4 else ["paramserver", "floor"]
                report["rows"].append(scenario_rounds("big", n, 3, big_systems, Path(tmp)))
    print("aggregation against memcpy", flush=True)
    report["aggregation"] = aggregation_vs_memcpy(100_000_000 if not args.quick else 16_000_000,
                                                  4)
    out = RESULTS / ("bench-quick.json" if args.quick else "bench.json")
    out.write_text(json.dumps(report, indent=2))
    chart(report["rows"], out.with_suffix(".png"))
    print(f"results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
