"""Runs a command while N busy processes load the CPU, then stops them.

    python scripts/busy.py 2 -- make test

`make stress-test` uses it: the test suite must hold on a busy machine (CI
runs wherever a machine is free, at times with a load of 10 or more on 2
cores). Each busy process spins for at most --limit seconds, so nothing is
left running even if this script is killed. Exits with the command's code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("busy", type=int, help="busy processes")
    parser.add_argument("--limit", type=float, default=3600.0,
                        help="seconds each busy process spins at most")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(limit=args.limit)])
                for _ in range(args.busy)]
    try:
        print(f"busy.py: {args.busy} busy processes, running {' '.join(command)}", flush=True)
        return subprocess.call(command)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


if __name__ == "__main__":
    sys.exit(main())
