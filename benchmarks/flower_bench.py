"""Flower side of the paramserver-vs-Flower benchmark.

Measures Flower's per-round time on the same workload as paramserver, on
loopback, with real processes:

* one server process: ``flwr.server.start_server`` (legacy API) with a FedAvg
  subclass that timestamps each round (``configure_fit`` start to
  ``aggregate_fit`` end, after all clients are connected, so start-up is
  excluded) and reports its peak RSS;
* one load-generator process running N ``flwr.client.start_client`` calls as
  threads; each client's ``fit`` returns the received parameters + 0.001
  (numpy only) with ``num_examples=100``.

Flower runs from its own venv (``benchmarks/.venv-flwr``, made by ``--setup``);
this orchestrator only needs the standard library, so any ``python3`` can run
it.  One JSON object per scenario is printed to stdout; logs go to stderr.

    python benchmarks/flower_bench.py --setup
    python benchmarks/flower_bench.py --clients 8 --rounds 10 --model mlp
    python benchmarks/flower_bench.py --clients 4 --rounds 3 --model big
"""

# The Flower roles' flwr/numpy are not in the project venv that type-checks this file, so
# the FedAvg/NumPyClient base classes are Any to mypy.
# mypy: allow-subclassing-any

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-flwr"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = HERE / "flower_requirements.txt"
STAMP = VENV / ".flower-bench-stamp"
FLWR_VERSION = "1.42.0"

# The workload; must match what paramserver is measured on.
MODEL_SHAPES: dict[str, list[tuple[int, ...]]] = {
    # MLP 784-128-10: 101,770 float32 values.
    "mlp": [(128, 784), (128,), (10, 128), (10,)],
    # One 5000x5000 float32 array: 100 MB.
    "big": [(5000, 5000)],
}
DELTA = 0.001  # the "training": every client adds this to every parameter
NUM_EXAMPLES = 100

SETUP_TIMEOUT_S = 1200.0
READY_TIMEOUT_S = 60.0  # server process start-up until its port accepts connections
KILL_GRACE_S = 5.0
POLL_S = 0.05


def log(msg: str) -> None:
    print(f"[flower_bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A benchmark run failed; the message says why."""


# --------------------------------------------------------------------------- setup


def _requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def venv_ready() -> bool:
    if not (VENV_PYTHON.exists() and STAMP.exists()):
        return False
    return STAMP.read_text().strip() == _requirements_digest()


def setup() -> None:
    """Create benchmarks/.venv-flwr and install the pinned requirements (idempotent)."""
    if venv_ready():
        log(f"{VENV} is up to date (stamp matches {REQUIREMENTS.name}); nothing to do")
        return
    python3 = shutil.which("python3") or sys.executable
    if not VENV_PYTHON.exists():
        log(f"creating {VENV} with {python3} -m venv")
        subprocess.run([python3, "-m", "venv", str(VENV)], check=True, timeout=300)
    STAMP.unlink(missing_ok=True)
    cmd = [
        str(VENV_PYTHON),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-r",
        str(REQUIREMENTS),
    ]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=SETUP_TIMEOUT_S)
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c", "import flwr, numpy; print(flwr.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=_flower_env(),
    )
    version = probe.stdout.strip().splitlines()[-1]
    if version != FLWR_VERSION:
        raise BenchError(f"venv has flwr {version}, expected {FLWR_VERSION}")
    STAMP.write_text(_requirements_digest() + "\n")
    log(f"{VENV} ready (flwr {version})")


def _flower_env() -> dict[str, str]:
    env = dict(os.environ)
    # Flower sends usage telemetry to its servers unless told not to: loopback only here.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- orchestrator


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1 (Flower cannot report its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server process exited early with code {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(POLL_S)
    raise BenchError(f"server did not listen on 127.0.0.1:{port} within {READY_TIMEOUT_S}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill, then reap one process that we started (in its own group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        # The group is ours (start_new_session) and its leader is not reaped yet.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)
    if proc.poll() is None:
        log(f"process {proc.pid} survived SIGKILL")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    if not venv_ready():
        raise BenchError(f"{VENV} missing or stale: run `{sys.argv[0]} --setup` first")
    script = str(Path(__file__).resolve())
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = _flower_env()
    started = time.monotonic()
    deadline = started + args.timeout
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        workdir = Path(tmp)
        result_file = workdir / "server-result.json"
        server_log = workdir / "server.log"
        clients_log = workdir / "clients.log"
        common = [
            "--clients",
            str(args.clients),
            "--rounds",
            str(args.rounds),
            "--model",
            args.model,
            "--address",
            address,
            "--timeout",
            str(args.timeout),
        ]
        try:
            with server_log.open("wb") as out:
                server_cmd = [str(VENV_PYTHON), script, "--role", "server", *common]
                server_cmd += ["--result-file", str(result_file)]
                if args.max_workers is not None:
                    server_cmd += ["--max-workers", str(args.max_workers)]
                server = subprocess.Popen(
                    server_cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            procs.append(server)
            wait_listening(port, server, min(deadline, time.monotonic() + READY_TIMEOUT_S))
            with clients_log.open("wb") as out:
                clients = subprocess.Popen(
                    [str(VENV_PYTHON), script, "--role", "clients", *common],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            procs.append(clients)
            # Bounded wait for both; whichever fails first ends the run.
            while time.monotonic() < deadline:
                if server.poll() is not None and clients.poll() is not None:
                    break
                for proc, name in ((server, "server"), (clients, "clients")):
                    if proc.poll() not in (None, 0):
                        raise BenchError(f"{name} process exited with code {proc.returncode}")
                time.sleep(POLL_S)
            else:
                raise BenchError(f"scenario did not finish within {args.timeout}s")
            if server.returncode != 0 or clients.returncode != 0:
                raise BenchError(
                    f"exit codes: server {server.returncode}, clients {clients.returncode}"
                )
            result: dict[str, Any] = json.loads(result_file.read_text())
        except BaseException:
            for proc in procs:
                stop_process(proc)
            log(f"--- server log (tail) ---\n{tail(server_log)}")
            log(f"--- clients log (tail) ---\n{tail(clients_log)}")
            raise
        finally:
            for proc in procs:
                stop_process(proc)
        if args.keep_logs:
            for src in (server_log, clients_log):
                shutil.copy(src, Path(args.keep_logs) / src.name)
    result["wall_seconds"] = round(time.monotonic() - started, 3)
    return result


# --------------------------------------------------------------------------- Flower roles
# Everything below runs under benchmarks/.venv-flwr/bin/python (flwr, numpy).


def initial_arrays(model: str) -> list[Any]:
    np = importlib.import_module("numpy")
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for shape in MODEL_SHAPES[model]]


def role_server(args: argparse.Namespace) -> int:
    import resource

    np = importlib.import_module("numpy")
    flwr = importlib.import_module("flwr")
    common = importlib.import_module("flwr.common")
    fl_server = importlib.import_module("flwr.server")
    # Static import so that FedAvg can be subclassed; flwr is absent where mypy runs.
    from flwr.server.strategy import FedAvg  # type: ignore[import-not-found,unused-ignore]

    n: int = args.clients
    wait_s = float(args.timeout)

    class TimedFedAvg(FedAvg):
        """FedAvg that records, per round, configure_fit start and aggregate_fit end."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.t_start: dict[int, float] = {}
            self.t_end: dict[int, float] = {}
            self.n_results: dict[int, int] = {}
            self.n_failures: dict[int, int] = {}

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            # Round 1 would otherwise include the wait for all clients to connect.
            if not client_manager.wait_for(n, timeout=wait_s):
                raise RuntimeError(f"only {client_manager.num_available()} of {n} clients")
            self.t_start[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            self.t_end[server_round] = time.perf_counter()
            self.n_results[server_round] = len(results)
            self.n_failures[server_round] = len(failures)
            return out

    init = initial_arrays(args.model)
    strategy = TimedFedAvg(
        min_fit_clients=n,
        min_available_clients=n,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        initial_parameters=common.ndarrays_to_parameters(init),
    )
    server = fl_server.Server(client_manager=fl_server.SimpleClientManager(), strategy=strategy)
    if args.max_workers is not None:
        server.set_max_workers(args.max_workers)
    fl_server.start_server(
        server_address=args.address,
        server=server,
        config=fl_server.ServerConfig(num_rounds=args.rounds, round_timeout=wait_s),
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    rounds = range(1, args.rounds + 1)
    problems = []
    for r in rounds:
        if r not in strategy.t_end:
            problems.append(f"round {r} not aggregated")
        elif strategy.n_results[r] != n or strategy.n_failures[r]:
            problems.append(
                f"round {r}: {strategy.n_results[r]} results, {strategy.n_failures[r]} failures"
            )
    # Sanity check of the workload: every round adds DELTA to every parameter.
    final = common.parameters_to_ndarrays(server.parameters)
    expected_shift = DELTA * args.rounds
    error = max(
        float(np.max(np.abs((f.astype(np.float64) - i) - expected_shift)))
        for f, i in zip(final, init, strict=True)
    )
    if error > 1e-4:
        problems.append(f"final model off by {error} from initial + {expected_shift}")
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 1
    result = {
        "system": "flower-legacy",
        "model": args.model,
        "clients": n,
        "rounds": args.rounds,
        "round_seconds": [round(strategy.t_end[r] - strategy.t_start[r], 6) for r in rounds],
        # Same definition as benchmarks/workload.round_periods: end(r) - end(r-1), with the
        # end of round r = aggregate_fit done on the server (no value for round 1).
        "round_periods_seconds": [
            round(strategy.t_end[r] - strategy.t_end[r - 1], 6) for r in rounds if r > 1
        ],
        "server_peak_rss_bytes": peak_rss,
        "flwr_version": flwr.__version__,
        "payload_floats": sum(int(a.size) for a in init),
        # Server.fit_clients' ThreadPoolExecutor; null = Python's default min(32, cpus + 4).
        "server_fit_max_workers": args.max_workers,
    }
    Path(args.result_file).write_text(json.dumps(result))
    return 0


def role_clients(args: argparse.Namespace) -> int:
    np = importlib.import_module("numpy")
    fl_client = importlib.import_module("flwr.client")
    from flwr.client import NumPyClient  # type: ignore[import-not-found,unused-ignore]

    delta = np.float32(DELTA)

    class BenchClient(NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[Any]:
            raise RuntimeError("not used: the server has initial_parameters")

        def fit(
            self, parameters: list[Any], config: dict[str, Any]
        ) -> tuple[list[Any], int, dict[str, Any]]:
            return [p + delta for p in parameters], NUM_EXAMPLES, {}

    errors: list[str] = []

    def one_client(i: int) -> None:
        try:
            fl_client.start_client(
                server_address=args.address,
                client=BenchClient().to_client(),
                insecure=True,
                max_retries=3,
                max_wait_time=30.0,
            )
        except BaseException as exc:
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=one_client, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        errors.append(f"{len(alive)} client threads still running at the deadline")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create/refresh the Flower venv and exit")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="mlp")
    p.add_argument("--timeout", type=float, default=300.0, help="whole-scenario limit in seconds")
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="Flower Server's fit thread pool (default: Flower's own, min(32, cpus + 4))",
    )
    p.add_argument("--keep-logs", metavar="DIR", help="copy server/clients logs into DIR")
    # Internal: the roles run under the Flower venv's python.
    p.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.timeout <= 0:
        p.error("--clients and --rounds must be >= 1 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "server":
        return role_server(args)
    if args.role == "clients":
        return role_clients(args)
    try:
        if args.setup:
            setup()
            return 0
        result = run_scenario(args)
    except (BenchError, subprocess.SubprocessError, OSError, ValueError) as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
