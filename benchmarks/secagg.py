"""Round time with secure aggregation against without, side by side in one
run, at N = 8 and 32 clients of the default MLP (real server and client
processes on loopback), and the time to recover one dropout.

For each N, a plain run and a --secagg run of the same clients (same data,
same seeds) each go R rounds; a round's time is the server's round_seconds
(from the round opening to its model being published: key exchange,
training, upload, unmasking). Prints the median of rounds 2..R (round 1
includes the clients' start-up) and the ratio secagg / plain. The issue's
target: at N = 8, a SecAgg round costs at most 3x a plain one.

Recovery: one client of a --secagg run at N = 8 is killed (kill -9) right
after its masked update of round 2 was acknowledged; the server drops it and
removes its pairwise masks from the others' reveals. Printed: round 2's time
against the median secagg round, and the unmasking alone (in-process) with
and without one dropped client.

    .venv/bin/python benchmarks/secagg.py                  # N = 8 and 32, 5 rounds
    .venv/bin/python benchmarks/secagg.py --clients 8 --rounds 3   # quick

Never asserts a time: the machine is shared; the ratios are side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from paramserver import codec, processes, training
from paramserver.faults import CRASH_ENV
from paramserver.quantize import Quantization
from paramserver.secagg import SecAggClient, unmask
from paramserver.secagg_server import masked_spec

EXAMPLES = 200  # per client and round: small, so that the protocol's cost shows


def run(workdir: Path, clients: int, rounds: int, secagg: bool,
        crash: str | None = None) -> list[dict[str, float]]:
    """One server and `clients` client processes; the round log's records."""
    workdir.mkdir(parents=True)
    ready, log = workdir / "ready.json", workdir / "rounds.jsonl"
    extra = ["--secagg", "--secagg-timeout", "10"] if secagg else []
    server_cmd = processes.paramserver_command(
        "serve", "--port", "0", "--clients", str(clients), "--rounds", str(rounds),
        "--round-timeout", "300", "--min-clients", "2", "--state-dir", str(workdir / "state"),
        "--ready-file", str(ready), "--round-log", str(log), "--eval-examples", "0",
        "--linger", "2", "--no-fsync", "--capacity", str(clients * 2), *extra)
    with open(workdir / "server.log", "wb") as out:
        server = processes.spawn(server_cmd, out)
    children = []
    try:
        port = processes.wait_for_ready_file(ready, server, timeout=120)
        for i in range(clients):
            env = {**os.environ, CRASH_ENV: crash} if crash and i == clients - 1 else None
            command = processes.paramserver_command(
                "client", f"c{i:02d}", "--server", f"127.0.0.1:{port}", "--examples",
                str(EXAMPLES), "--index", str(i), "--num-clients", str(clients))
            with open(workdir / f"c{i:02d}.log", "wb") as out:
                children.append(processes.spawn(command, out, env=env))
        for child in children:
            child.wait(1800)
        server.wait(600)
    finally:
        for process in [*children, server]:
            processes.stop(process)
    return [json.loads(line) for line in log.read_text().splitlines()
            if json.loads(line).get("kind", "round") == "round"]


def median_round(records: list[dict[str, float]]) -> float:
    return statistics.median(r["round_seconds"] for r in records[1:])


def unmask_seconds(clients: int, dropped: int, repeat: int = 3) -> float:
    """Unmasking one round of the MLP in-process (the server's part alone)."""
    q = Quantization()
    length = masked_spec(codec.spec_of(training.build_model("mlp", 0).state_dict()))[0].shape[0]
    names = [f"c{i:02d}" for i in range(clients)]
    protocol = {n: SecAggClient(n, b"bench", q) for n in names}
    roster = {n: p.advertise() for n, p in protocol.items()}
    threshold = clients // 2 + 1
    boxes = {n: p.share_keys(roster, threshold) for n, p in protocol.items()}
    rng = np.random.default_rng(0)
    masked = {n: protocol[n].mask(rng.integers(0, 2**63, length, dtype=np.uint64),
                                  {s: b[n] for s, b in boxes.items() if n in b})
              for n in names}
    included = frozenset(names[:clients - dropped])
    reveals = {n: protocol[n].reveal(included, frozenset(names) - included) for n in included}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        unmask({n: masked[n] for n in included}, roster, frozenset(names), reveals, threshold,
               b"bench", q)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {"rounds": args.rounds, "examples": EXAMPLES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.clients:
            plain = median_round(run(root / f"plain{n}", n, args.rounds, False))
            secure = median_round(run(root / f"secagg{n}", n, args.rounds, True))
            results[f"n{n}"] = {"plain": plain, "secagg": secure, "ratio": secure / plain}
            print(f"N = {n:2d}: plain {plain:.3f} s/round, secagg {secure:.3f} s/round, "
                  f"ratio {secure / plain:.2f}x", flush=True)
        n = min(args.clients)
        records = run(root / "dropout", n, 2, True, crash="client_after_masked:2")
        dropout_round = records[1]["round_seconds"]
        secure_median = results[f"n{n}"]["secagg"]  # type: ignore[index]
        none, one = unmask_seconds(n, 0), unmask_seconds(n, 1)
        results["dropout"] = {"clients": n, "round_seconds": dropout_round,
                              "num_updates": records[1]["num_updates"],
                              "unmask_none": none, "unmask_one_dropped": one}
        print(f"N = {n}, one client killed after its masked update of round 2: round 2 took "
              f"{dropout_round:.3f} s with {records[1]['num_updates']} updates (a secagg round: "
              f"{secure_median:.3f} s); unmasking alone {none:.3f} s, with one dropped "
              f"{one:.3f} s (+{one - none:.3f} s to recover it)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
