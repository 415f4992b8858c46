"""Aggregation time and peak RSS of the robust strategies against FedAvg, on
the server's own path (spooled update files read block by block), in one run.

16 clients of a 100 MB model (one float32 Linear 5000x5000) are written to a
spool once; then each strategy aggregates them in a process of its own (so
that each peak RSS is its own), several times. Prints, per strategy, the
median time, the ratio to FedAvg, the peak RSS above the process's base (the
imports and the current global model) and the target the issue sets:
base + 3 x model + clients x block.

    .venv/bin/python benchmarks/strategies.py                 # 16 clients, 100 MB
    .venv/bin/python benchmarks/strategies.py --clients 4 --mb 10 --repeat 1   # quick

Never asserts an absolute time: the machine is shared; the ratios are measured
side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from paramserver import codec, spool, strategies
from paramserver.aggregation import Driver, block_bytes_for

STRATEGIES: dict[str, dict[str, float]] = {
    "fedavg": {}, "median": {}, "trimmed_mean": {"trim": 0.125},
    "krum": {"byzantine": 1, "selected": 1}}


def make_spool(root: Path, clients: int, numel: int) -> list[spool.SpooledUpdate]:
    store = spool.Spool(root)
    updates = []
    for i in range(clients):
        state = {"w": torch.randn(numel, generator=torch.Generator().manual_seed(i))}
        views = codec.payload_views(state)
        header = codec.UpdateHeader(f"c{i:02d}", 1, 100 + i, codec.spec_of(state),
                                    codec.payload_digest(views))
        writer = store.writer(header)
        for piece in codec.iter_chunks(views, codec.DEFAULT_CHUNK_SIZE):
            writer.write(piece)
        writer.seal()
        updates.append(writer.commit())
    return updates


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One strategy, `repeat` aggregations: prints JSON of times and RSS."""
    torch.set_num_threads(1)
    root = Path(args.spool)
    updates = _load(root)
    specs = updates[0].header.specs
    current = bytearray(codec.payload_size(specs))  # the global model the round starts from
    base = rss_mb()
    strategy = strategies.build(args.strategy, STRATEGIES[args.strategy])
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        with spool.SpoolReader(updates) as reader:
            Driver(specs, strategy, reader, updates, current, b"").run()
        times.append(time.perf_counter() - started)
    print(json.dumps({"strategy": args.strategy, "times": times, "base_mb": base,
                      "peak_mb": rss_mb(), "block_bytes": block_bytes_for(len(updates))}))


def _load(root: Path) -> list[spool.SpooledUpdate]:
    store = spool.Spool(root)
    specs = spool.read_update_header(next(store.round_dir(1).glob("*.update"))).specs
    return store.load_round(1, specs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--mb", type=float, default=100.0, help="model size in MB (float32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spool", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    numel = int(args.mb * 1e6 / 4)
    model_mb = numel * 4 / 2**20
    with tempfile.TemporaryDirectory(prefix="ps-strategies-") as tmp:
        make_spool(Path(tmp), args.clients, numel)
        results = []
        for name in STRATEGIES:
            out = subprocess.run([sys.executable, __file__, "--child", "--spool", tmp,
                                  "--strategy", name, "--repeat", str(args.repeat)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fedavg = statistics.median(results[0]["times"])
    block_mb = results[0]["block_bytes"] / 2**20
    target = 3 * model_mb + args.clients * block_mb
    print(f"{args.clients} clients, model {model_mb:.0f} MiB, block {block_mb * 1024:.0f} KiB, "
          f"{args.repeat} aggregations each; RSS above base, target 3 x model + clients x "
          f"block = {target:.0f} MiB")
    print(f"{'strategy':>13} {'median s':>9} {'x fedavg':>9} {'RSS above base':>15} "
          f"{'of target':>10}")
    for r in results:
        median = statistics.median(r["times"])
        above = r["peak_mb"] - r["base_mb"]
        print(f"{r['strategy']:>13} {median:>9.2f} {median / fedavg:>9.2f} "
              f"{above:>11.0f} MiB {above / target:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"clients": args.clients, "model_mib": model_mb,
                                         "target_mib": target, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
