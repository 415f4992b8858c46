"""Side-by-side benchmark: paramserver, the hand-written floor (floor.py) and
Flower (flower_bench.py, in its own venv: its legacy API, and its deployment
engine at N = 2 and 8), same model, same N, same local work,
real processes on loopback, in one run. Prints ratios with medians and spread,
writes JSON and a PNG chart.

Scenarios: MLP rounds at N = 2, 8, 32, 64; the 100 MB model at N = 4; server
peak RSS for the 100 MB model at N = 4 and N = 64; 256 clients for 20 rounds
against a server whose capacity is 256, with a 257th client that must get
RESOURCE_EXHAUSTED; the soak (soak.py, 1000 rounds); aggregation against memcpy.

    make bench                          # everything (Flower is set up on first use)
    .venv/bin/python benchmarks/bench.py --quick      # MLP at N=2,8 only, no Flower

Never asserts an absolute time: the machine is shared; only ratios measured
side by side mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import round_periods  # noqa: E402

from paramserver import errors, processes  # noqa: E402
from paramserver.client import ParameterServerClient  # noqa: E402

RESULTS = HERE / "results"
# Flower's current (deployment) engine runs offline here but polls every 3 s
# and starts a process per message: measured at the small client counts only.
DEPLOYMENT_CLIENTS = (2, 8)
DEPLOYMENT_ROUNDS = 4


# -- the paramserver load generator (runs as one or more processes) -------------------


class SharedUpdate:
    """Lean clients, for large models at many clients: every client of the
    process sends the same update (computed once per round) and streams the
    global model through its digest check without keeping it. The server's
    work is unchanged; the load generator holds one model, not two per client.

    update(r) = update(r-1) + 0.001. A client asks for round r only after it
    holds the global model of r-1, so every client has sent r-1 by then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round = 0
        self._update: dict[str, torch.Tensor] | None = None

    def for_round(self, round: int, initial: Callable[[], dict[str, torch.Tensor]],
                  ) -> dict[str, torch.Tensor]:
        """`initial()` (the global model of round 0) is called by the first caller only."""
        with self._lock:
            if self._update is None:
                self._update = initial()
            while self._round < round:
                self._update = {k: v + 0.001 for k, v in self._update.items()}
                self._round += 1
            return self._update


def load_paramserver(server: str, names: list[str], rounds: int,
                     lean: bool = False) -> list[list[float]]:
    """One thread per client name; returns when each client held each round's
    global model (time.monotonic, comparable across processes)."""
    done: list[list[float]] = [[] for _ in names]
    errors: list[str] = []
    shared = SharedUpdate()

    def client(i: int) -> None:
        try:
            with ParameterServerClient(server, timeout=1800) as c:
                reg = c.register(names[i])
                if not lean:
                    _, model = c.get_model(reg.client_id, reg.model_round)
                for round in range(reg.first_round, reg.first_round + rounds):
                    if lean:
                        update = shared.for_round(round, lambda: c.get_model(
                            reg.client_id, reg.model_round)[1])
                        c.send_update(reg.client_id, round, update, 100)
                        c.download_model(reg.client_id, round, lambda data: None)
                    else:
                        update = {k: v + 0.001 for k, v in model.items()}
                        _, model = c.exchange(reg.client_id, round, update, 100)
                    done[i].append(time.monotonic())
        except Exception as error:
            errors.append(f"{names[i]}: {error!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[:3])
    return done


def run_load(address: str, clients: int, rounds: int, load_processes: int = 1,
             lean: bool = False) -> list[float]:
    """`clients` clients spread over `load_processes` load-generator processes
    (threads within each); the server cannot tell. Returns round periods."""
    per = -(-clients // load_processes)
    commands = []
    for first in range(0, clients, per):
        commands.append([sys.executable, str(HERE / "bench.py"), "load-paramserver",
                         "--server", address, "--first", str(first),
                         "--clients", str(min(per, clients - first)), "--rounds", str(rounds),
                         *(["--lean"] if lean else [])])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    done: list[list[float]] = []
    failures = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                failures.append(err[-2000:])
            else:
                done += json.loads(out.strip().splitlines()[-1])["done"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        raise RuntimeError(f"load generator failed: {failures[0]}")
    return round_periods(done)


# -- running one system ------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set, exact (no sampling)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run_system(system: str, model: str, clients: int, rounds: int, workdir: Path,
               lean: bool = False) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    if system.startswith("flower"):
        engine = "deployment" if system == "flower-deployment" else "legacy"
        if engine == "deployment":  # a round takes seconds (3 s polling): a few suffice
            rounds = min(rounds, DEPLOYMENT_ROUNDS)
        out = subprocess.run([sys.executable, str(HERE / "flower_bench.py"), "--clients",
                              str(clients), "--rounds", str(rounds), "--model", model,
                              "--engine", engine],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"flower failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # Periods between round ends: the same definition as for the others.
        return {"round_seconds": result["round_periods_seconds"],
                "server_peak_rss": result.get("server_peak_rss_bytes")}
    with started_server(system, model, clients, workdir) as (server, address):
        if system == "floor":
            load = [sys.executable, str(HERE / "floor.py"), "load", "--server", address,
                    "--clients", str(clients), "--rounds", str(rounds), "--model", model]
            out = subprocess.run(load, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"{system} load failed: {out.stderr[-2000:]}")
            periods = json.loads(out.stdout.strip().splitlines()[-1])["round_seconds"]
        else:
            periods = run_load(address, clients, rounds, lean=lean)
        return {"round_seconds": periods, "server_peak_rss": peak_rss(server.pid)}


@contextlib.contextmanager
def started_server(system: str, model: str, clients: int, workdir: Path, *extra: str,
                   capacity: int | None = None,
                   ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A floor or paramserver server process on 127.0.0.1:0; stopped and reaped on exit."""
    ready = workdir / "ready.json"
    if system == "floor":
        serve = [sys.executable, str(HERE / "floor.py"), "serve", "--clients", str(clients),
                 "--ready-file", str(ready)]
    else:
        serve = processes.paramserver_command(
            "--log-level", "WARNING", "serve", "--port", "0", "--clients", str(clients),
            "--rounds", "0", "--model", model, "--eval-examples", "0", "--ready-file",
            str(ready), "--state-dir", str(workdir / "state"),
            "--capacity", str(capacity or max(256, clients)),
            *(["--no-fsync"] if system == "paramserver-nofsync" else []), *extra)
    with open(workdir / "server.log", "wb") as log:
        server = processes.spawn(serve, log)
    try:
        port = processes.wait_for_ready_file(ready, server, timeout=120)
        yield server, f"127.0.0.1:{port}"
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
        print(f"  ratio {name}: {ratio:.3g}x", flush=True)
    return row


def big_rss_by_clients(workdir: Path, counts: tuple[int, ...] = (4, 64)) -> dict[str, Any]:
    """Server peak RSS with the 100 MB model at each client count, lean load
    generators (see SharedUpdate) so that only the server's memory grows."""
    rss = {}
    for n in counts:
        result = run_system("paramserver", "big", n, 2, workdir / f"big-rss-{n}", lean=True)
        rss[n] = result["server_peak_rss"]
        print(f"  100 MB model, N={n}: server peak RSS {rss[n] / 2**20:.0f} MiB", flush=True)
    ratio = rss[counts[-1]] / rss[counts[0]]
    print(f"  RSS N={counts[-1]} / N={counts[0]}: {ratio:.2f}x", flush=True)
    return {"server_peak_rss": rss, "ratio": ratio}


def scenario_scale(clients: int, rounds: int, load_processes: int,
                   workdir: Path) -> dict[str, Any]:
    """`clients` clients (threads in `load_processes` processes) run `rounds`
    MLP rounds against a server whose capacity is exactly `clients`; once all
    are registered, one more client must be refused with RESOURCE_EXHAUSTED
    (promptly, not by hanging). Checks every round counted every client."""
    workdir.mkdir(parents=True, exist_ok=True)
    round_log = workdir / "rounds.jsonl"
    result: dict[str, Any] = {"clients": clients, "rounds": rounds,
                              "load_processes": load_processes}
    with started_server("paramserver", "mlp", clients, workdir, "--round-log", str(round_log),
                        capacity=clients) as (server, address):
        periods: list[float] = []
        failure: list[BaseException] = []

        def load() -> None:
            try:
                periods.extend(run_load(address, clients, rounds, load_processes))
            except BaseException as error:  # reported below
                failure.append(error)

        loader = threading.Thread(target=load)
        loader.start()
        result["refusal"] = refuse_one_more(address, round_log, loader)
        loader.join()
        if failure:
            raise RuntimeError(f"scale run failed: {failure[0]}")
        result["server_peak_rss"] = peak_rss(server.pid)
    records = [json.loads(line) for line in round_log.read_text().splitlines()]
    result["rounds_completed"] = len(records)
    result["all_clients_counted"] = all(r["num_updates"] == clients for r in records)
    result["round"] = summarise(periods)
    print(f"  {clients} clients x {rounds} rounds: {len(records)} rounds, every client counted "
          f"in each: {result['all_clients_counted']}, round median "
          f"{result['round']['median'] * 1000:.0f} ms; client {clients + 1}: "
          f"{result['refusal']}", flush=True)
    if len(records) != rounds or not result["all_clients_counted"]:
        raise RuntimeError(f"scale run incomplete: {result}")
    return result


def refuse_one_more(address: str, round_log: Path, loader: threading.Thread,
                    ) -> dict[str, Any]:
    # Round 1 is published only after every client registered (min_clients).
    deadline = time.monotonic() + 600
    while not (round_log.exists() and round_log.read_text()):
        if not loader.is_alive() or time.monotonic() > deadline:
            return {"outcome": "not tried: round 1 never closed"}
        time.sleep(0.05)
    started = time.monotonic()
    try:
        with ParameterServerClient(address, timeout=30) as extra:
            extra.register("one-too-many")
        outcome = "accepted (capacity not enforced)"
    except errors.CapacityError as error:
        outcome = f"RESOURCE_EXHAUSTED: {error}"
    return {"outcome": outcome, "seconds": time.monotonic() - started}


def soak(rounds: int) -> dict[str, Any]:
    """The fault-tolerance issue's soak (soak.py): a real server for `rounds`
    rounds; RSS, thread and descriptor slopes. Its summary, with whether its
    targets were met."""
    print(f"soak, {rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary_file = Path(tmp) / "soak.json"
        out = subprocess.run([sys.executable, str(HERE / "soak.py"), "--rounds", str(rounds),
                              "--clients", "4", "--json", str(summary_file)],
                             capture_output=True, text=True, timeout=3600)
        if not summary_file.exists():
            raise RuntimeError(f"soak failed: {out.stderr[-2000:]}")
        summary: dict[str, Any] = json.loads(summary_file.read_text())
    print(f"  RSS slope {summary['rss_slope_bytes_per_round'] / 1024:.1f} KiB/round, threads "
          f"{summary['threads_range_after_warmup']}, descriptors "
          f"{summary['fds_range_after_warmup']}: targets met {summary['targets_met']}",
          flush=True)
    return summary


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
        agg, cold, warm = [], [], []
        source = bytearray(model_bytes)
        target = memoryview(bytearray(model_bytes))
        for _ in range(5):
            t = time.perf_counter()
            aggregate(specs, updates)
            agg.append(model_bytes * clients / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(clients):  # into fresh memory: page faults included
                bytearray(source)
            cold.append(model_bytes * clients / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(clients):  # into memory already mapped: the pure copy
                target[:] = source
            warm.append(model_bytes * clients / (time.perf_counter() - t))
    result = {"model_bytes": model_bytes, "clients": clients,
              "aggregation_bytes_per_s": statistics.median(agg),
              "memcpy_cold_bytes_per_s": statistics.median(cold),
              "memcpy_bytes_per_s": statistics.median(warm)}
    result["ratio"] = result["aggregation_bytes_per_s"] / result["memcpy_bytes_per_s"]
    result["ratio_cold"] = result["aggregation_bytes_per_s"] / result["memcpy_cold_bytes_per_s"]
    print(f"  aggregation {result['aggregation_bytes_per_s'] / 1e9:.2f} GB/s vs memcpy "
          f"{result['memcpy_bytes_per_s'] / 1e9:.2f} GB/s: {result['ratio']:.2f}x "
          f"(vs a copy into fresh memory, {result['memcpy_cold_bytes_per_s'] / 1e9:.2f} GB/s: "
          f"{result['ratio_cold']:.2f}x)", flush=True)
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
        parser.add_argument("--first", type=int, default=0)
        parser.add_argument("--clients", type=int, required=True)
        parser.add_argument("--rounds", type=int, required=True)
        parser.add_argument("--lean", action="store_true")
        args = parser.parse_args()
        torch.set_num_threads(1)
        names = [f"c{i:04d}" for i in range(args.first, args.first + args.clients)]
        print(json.dumps({"done": load_paramserver(args.server, names, args.rounds,
                                                   args.lean)}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="MLP at N=2,8; no Flower")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, nargs="*", default=[2, 8, 32, 64])
    parser.add_argument("--scale", type=int, default=256, help="clients in the scale run")
    parser.add_argument("--scale-rounds", type=int, default=20)
    parser.add_argument("--soak-rounds", type=int, default=1000)
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
            deployment = ["flower-deployment"] if flower and n in DEPLOYMENT_CLIENTS else []
            report["rows"].append(scenario_rounds("mlp", n, args.rounds, systems + deployment,
                                                  Path(tmp)))
        if not args.quick:
            print("100 MB model, N=4", flush=True)
            report["rows"].append(scenario_rounds("big", 4, 3, systems, Path(tmp)))
            report["big_rss"] = big_rss_by_clients(Path(tmp))
            print(f"{args.scale} clients, {args.scale_rounds} rounds", flush=True)
            report["scale"] = scenario_scale(args.scale, args.scale_rounds, 4,
                                             Path(tmp) / "scale")
    if not args.quick:
        report["soak"] = soak(args.soak_rounds)
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
