"""Long chaos repetitions: runs the chaos cases of tests/integration/test_chaos.py
again and again (each repetition a fresh pytest process, so fresh servers,
clients, sockets and state dirs), bounded in count and time, and reports how
many passed.

    .venv/bin/python benchmarks/chaos.py --repeat 5 --max-seconds 3000

Exits 1 if any repetition failed; the failing runs' output is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=3000)
    parser.add_argument("-k", default="", help="pytest -k expression to pick cases")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_seconds
    runs: list[dict[str, int | float | dict[str, int]]] = []
    totals = {"passed": 0, "failed": 0}
    for i in range(args.repeat):
        if time.monotonic() > deadline:
            break
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "integration" / "test_chaos.py")]
        if args.k:
            command += ["-k", args.k]
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                timeout=max(60.0, deadline - time.monotonic()))
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error)", tail)}
        totals["passed"] += counts.get("passed", 0)
        totals["failed"] += counts.get("failed", 0) + counts.get("error", 0)
        runs.append({"repetition": i + 1, "exit": result.returncode, "counts": counts,
                     "seconds": round(time.monotonic() - started, 1)})
        if result.returncode != 0:
            (args.out / f"chaos-failure-{i + 1}.log").write_text(result.stdout + result.stderr)
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"repetitions": len(runs), "cases_passed": totals["passed"],
                      "cases_failed": totals["failed"]}))
    return 0 if runs and totals["failed"] == 0 and all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
