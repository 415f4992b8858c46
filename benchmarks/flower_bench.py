"""Flower side of the paramserver-vs-Flower benchmark.

Measures Flower's per-round time on the same workload as paramserver, on
loopback, with real processes. The server side is a FedAvg subclass that
timestamps each round (``configure_fit`` start, once all clients are connected,
to ``aggregate_fit`` end: start-up is excluded), checks the final model and
reports its peak RSS; each client's ``fit`` returns the received parameters +
0.001 (numpy only) with ``num_examples=100``.

``--engine legacy`` (default, "flower-legacy"): one server process running the
deprecated ``flwr.server.start_server``, and one load-generator process running
N ``flwr.client.start_client`` calls as threads (``--client-processes K``
spreads them over K processes).

``--engine deployment`` ("flower-deployment"): Flower's current engine, all on
127.0.0.1 -- ``flower-superlink``, N ``flower-supernode`` processes, and the
same strategy/client packaged as a Flower app (generated in a temp dir) that
``flwr run --stream`` submits; the ServerApp and ClientApps run in the
subprocesses that SuperLink and SuperNodes spawn.

Flower runs from its own venv (``benchmarks/.venv-flwr``, made by ``--setup``);
this orchestrator only needs the standard library, so any ``python3`` can run
it.  One JSON object per scenario is printed to stdout; logs go to stderr.

    python benchmarks/flower_bench.py --setup
    python benchmarks/flower_bench.py --clients 8 --rounds 10 --model mlp
    python benchmarks/flower_bench.py --clients 4 --rounds 3 --model big
    python benchmarks/flower_bench.py --clients 8 --rounds 10 --engine deployment
"""

# The Flower roles' flwr/numpy are not in the project venv that type-checks this file, so
# the FedAvg/NumPyClient base classes are Any to mypy.
# mypy: allow-subclassing-any

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
import traceback
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
    # pip's output goes to stderr: stdout carries only the scenario JSON lines.
    subprocess.run(cmd, check=True, timeout=SETUP_TIMEOUT_S, stdout=sys.stderr)
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
    raise BenchError(f"nothing listened on 127.0.0.1:{port} in time")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(roots: list[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of roots."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: list[tuple[int, int]] = []
    todo = list(roots)
    while todo and len(found) < 10_000:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _die_with_parent(parent: int) -> Any:
    """preexec_fn: the child gets SIGTERM when this orchestrator dies, even by SIGKILL
    (e.g. a caller's subprocess timeout), so nothing is left behind; Flower's own helper
    processes follow their parents (flower-superexec --parent-pid)."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)

    return preexec


class Processes:
    """Every process a scenario starts; stop_all() ends and reaps them, whatever happened.

    Each is started in its own session; Flower's SuperLink/SuperNode start helpers
    (flower-superexec, flwr-serverapp, flwr-clientapp) in sessions of their own, so
    those are found through /proc before stopping and ended by pid (checked against
    their start time, so that a reused pid is never hit).
    """

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.logs[name] = self.workdir / f"{name}.log"
        with self.logs[name].open("wb") as out:
            self.procs[name] = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )

    def failed(self, names: list[str] | None = None) -> dict[str, int]:
        codes = {n: self.procs[n].poll() for n in names or list(self.procs)}
        return {n: c for n, c in codes.items() if c is not None and c != 0}

    def stop_all(self) -> None:
        extra = descendants([p.pid for p in self.procs.values() if p.poll() is None])
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its group; leader not reaped yet
        for pid, start in extra:
            if (stat := _proc_stat(pid)) is not None and stat[1] == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE_S)
            if proc.poll() is None:
                log(f"process {proc.pid} survived SIGKILL")
        for pid, start in extra:
            end = time.monotonic() + KILL_GRACE_S
            while (stat := _proc_stat(pid)) is not None and stat[1] == start:
                if time.monotonic() > end:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(POLL_S)

    def dump_logs(self) -> None:
        for name, path in self.logs.items():
            log(f"--- {name} log (tail) ---\n{tail(path)}")

    def keep_logs(self, into: str | None) -> None:
        if into:
            for path in self.logs.values():
                if path.exists():
                    shutil.copy(path, Path(into) / path.name)


def wait_all(procs: Processes, names: list[str], deadline: float, what: str) -> None:
    """Bounded wait until names have all exited 0; any other exit of any process fails."""
    while time.monotonic() < deadline:
        if failed := procs.failed():
            raise BenchError(f"process(es) failed, exit codes: {failed}")
        if all(procs.procs[n].poll() == 0 for n in names):
            return
        time.sleep(POLL_S)
    raise BenchError(f"{what} did not finish in time (--timeout)")


def peak_rss_of(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def split(total: int, parts: int) -> list[int]:
    """total clients over parts processes, as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def read_result(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BenchError("the server side wrote no result (the last round never ended)")
    result: dict[str, Any] = json.loads(path.read_text())
    if "error" in result:
        raise BenchError(f"server side: {result['error']}")
    return result


def run_legacy(args: argparse.Namespace, procs: Processes, deadline: float) -> dict[str, Any]:
    script = str(Path(__file__).resolve())
    port = free_port()
    result_file = procs.workdir / "server-result.json"
    common = ["--rounds", str(args.rounds), "--model", args.model]
    common += ["--address", f"127.0.0.1:{port}", "--timeout", str(args.timeout)]
    server_cmd = [str(VENV_PYTHON), script, "--role", "server", *common]
    server_cmd += ["--clients", str(args.clients), "--result-file", str(result_file)]
    if args.max_workers is not None:
        server_cmd += ["--max-workers", str(args.max_workers)]
    procs.spawn("server", server_cmd)
    wait_listening(port, procs.procs["server"], min(deadline, time.monotonic() + READY_TIMEOUT_S))
    shares = split(args.clients, min(args.client_processes, args.clients))
    for k, share in enumerate(shares):
        name = "clients" if len(shares) == 1 else f"clients-{k}"
        cmd = [str(VENV_PYTHON), script, "--role", "clients", *common, "--clients", str(share)]
        procs.spawn(name, cmd)
    wait_all(procs, list(procs.procs), deadline, "the scenario")
    result = read_result(result_file)
    result["client_processes"] = len(shares)
    # Server.fit_clients' ThreadPoolExecutor; null = Python's default min(32, cpus + 4).
    result["server_fit_max_workers"] = args.max_workers
    return result


APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flbench"
version = "1.0.0"
description = "paramserver benchmark: Flower side (generated by flower_bench.py)"
license = "Apache-2.0"
dependencies = ["flwr=={flwr}", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "paramserver-bench"

[tool.flwr.app.components]
serverapp = "flbench_app.server_app:app"
clientapp = "flbench_app.client_app:app"

[tool.flwr.app.config]
clients = {clients}
rounds = {rounds}
model = "{model}"
timeout = {timeout}
result-file = "{result_file}"
"""


def run_deployment(args: argparse.Namespace, procs: Processes, deadline: float) -> dict[str, Any]:
    """flower-superlink + N flower-supernode + `flwr run` of a generated Flower app."""
    work = procs.workdir
    result_file = work / "server-result.json"
    app = work / "app"
    (app / "flbench_app").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        APP_PYPROJECT.format(
            flwr=FLWR_VERSION,
            clients=args.clients,
            rounds=args.rounds,
            model=args.model,
            timeout=float(args.timeout),
            result_file=result_file,
        )
    )
    (app / "flbench_app" / "__init__.py").write_text("")
    shutil.copy(Path(__file__).resolve(), app / "flbench_app" / "core.py")
    for kind in ("server", "client"):
        (app / "flbench_app" / f"{kind}_app.py").write_text(
            f"from flbench_app.core import deployment_{kind}_app\n\napp = deployment_{kind}_app()\n"
        )
    port = free_port()
    home = work / "flwr-home"  # FLWR_HOME: the CLI's config and SuperLink's installed apps
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    bin_dir = VENV_PYTHON.parent
    env = dict(procs.env)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # it spawns flower-superexec
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # no `uv sync` from an index
    env["FLWR_HOME"] = str(home)
    procs.env = env
    link_cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
    link_cmd += ["--port", str(port), "--disable-runtime-dependency-installation"]
    procs.spawn("superlink", link_cmd)
    wait_listening(
        port, procs.procs["superlink"], min(deadline, time.monotonic() + READY_TIMEOUT_S)
    )
    for i in range(args.clients):
        node_home = work / f"flwr-home-node{i}"  # one per node: app installs do not race
        node_home.mkdir()
        cmd = [str(bin_dir / "flower-supernode"), "--insecure", "--superlink"]
        cmd += [f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(free_port())]
        procs.spawn(f"supernode-{i}", cmd, env={**env, "FLWR_HOME": str(node_home)})
    procs.spawn("flwr-run", [str(bin_dir / "flwr"), "run", str(app), "--stream"])
    # `flwr run --stream` returns when the run has ended, whichever way.
    wait_all(procs, ["flwr-run"], deadline, "the run")
    result = read_result(result_file)
    superlink_rss = peak_rss_of(procs.procs["superlink"].pid)
    result["serverapp_peak_rss_bytes"] = result["server_peak_rss_bytes"]
    result["superlink_peak_rss_bytes"] = superlink_rss
    # The server side is two processes here: SuperLink (relays every message) and the
    # ServerApp (runs the strategy). Their peaks added: an upper bound of the two together.
    result["server_peak_rss_bytes"] = result["server_peak_rss_bytes"] + (superlink_rss or 0)
    result["supernode_processes"] = args.clients
    return result


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    if not venv_ready():
        raise BenchError(f"{VENV} missing or stale: run `{sys.argv[0]} --setup` first")
    started = time.monotonic()
    deadline = started + args.timeout
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        procs = Processes(Path(tmp), _flower_env())
        try:
            run = run_deployment if args.engine == "deployment" else run_legacy
            result = run(args, procs, deadline)
        except BaseException:
            procs.stop_all()
            procs.dump_logs()
            raise
        finally:
            procs.stop_all()
            procs.keep_logs(args.keep_logs)
    result["wall_seconds"] = round(time.monotonic() - started, 3)
    return result


# --------------------------------------------------------------------------- Flower side
# Everything below runs under benchmarks/.venv-flwr/bin/python (flwr, numpy), either
# from this file (legacy roles) or as the generated Flower app's copy of it.


def initial_arrays(model: str) -> list[Any]:
    np = importlib.import_module("numpy")
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for shape in MODEL_SHAPES[model]]


def make_strategy(
    *, system: str, clients: int, rounds: int, model: str, wait_s: float, result_file: str
) -> Any:
    """FedAvg timing each round; at the end of the last one it checks the model and
    writes the result (or {"error": ...}) to result_file."""
    import resource

    np = importlib.import_module("numpy")
    flwr = importlib.import_module("flwr")
    common = importlib.import_module("flwr.common")
    # Static import so that FedAvg can be subclassed; flwr is absent where mypy runs.
    from flwr.server.strategy import FedAvg  # type: ignore[import-not-found,unused-ignore]

    init = initial_arrays(model)

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
            if not client_manager.wait_for(clients, timeout=wait_s):
                raise RuntimeError(f"only {client_manager.num_available()} of {clients} clients")
            self.t_start[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            self.t_end[server_round] = time.perf_counter()
            self.n_results[server_round] = len(results)
            self.n_failures[server_round] = len(failures)
            if server_round == rounds:
                try:
                    result = self.result(out[0])
                except Exception as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                Path(result_file).write_text(json.dumps(result))
            return out

        def result(self, final_parameters: Any) -> dict[str, Any]:
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
            problems = []
            for r in range(1, rounds + 1):
                if r not in self.t_end:
                    problems.append(f"round {r} not aggregated")
                elif self.n_results[r] != clients or self.n_failures[r]:
                    problems.append(
                        f"round {r}: {self.n_results[r]} results, {self.n_failures[r]} failures"
                    )
            if final_parameters is None:
                problems.append("no aggregated model")
            else:
                # Sanity check of the workload: every round adds DELTA to every parameter.
                final = common.parameters_to_ndarrays(final_parameters)
                shift = DELTA * rounds
                off = max(
                    float(np.max(np.abs((f.astype(np.float64) - i) - shift)))
                    for f, i in zip(final, init, strict=True)
                )
                if off > 1e-4:
                    problems.append(f"final model off by {off} from initial + {shift}")
            if problems:
                return {"error": "; ".join(problems)}
            ends = self.t_end
            return {
                "system": system,
                "model": model,
                "clients": clients,
                "rounds": rounds,
                "round_seconds": [round(ends[r] - self.t_start[r], 6) for r in ends],
                # Same definition as benchmarks/workload.round_periods: end(r) - end(r-1),
                # with the end of round r = aggregate_fit done (no value for round 1).
                "round_periods_seconds": [round(ends[r] - ends[r - 1], 6) for r in ends if r > 1],
                "server_peak_rss_bytes": peak_rss,
                "flwr_version": flwr.__version__,
                "payload_floats": sum(int(a.size) for a in init),
            }

    return TimedFedAvg(
        min_fit_clients=clients,
        min_available_clients=clients,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        initial_parameters=common.ndarrays_to_parameters(init),
    )


def make_client() -> Any:
    np = importlib.import_module("numpy")
    from flwr.client import NumPyClient  # type: ignore[import-not-found,unused-ignore]

    delta = np.float32(DELTA)

    class BenchClient(NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[Any]:
            raise RuntimeError("not used: the server has initial_parameters")

        def fit(
            self, parameters: list[Any], config: dict[str, Any]
        ) -> tuple[list[Any], int, dict[str, Any]]:
            return [p + delta for p in parameters], NUM_EXAMPLES, {}

    return BenchClient()


def role_server(args: argparse.Namespace) -> int:
    """Legacy engine: flwr.server.start_server in this process."""
    fl_server = importlib.import_module("flwr.server")
    strategy = make_strategy(
        system="flower-legacy",
        clients=args.clients,
        rounds=args.rounds,
        model=args.model,
        wait_s=float(args.timeout),
        result_file=args.result_file,
    )
    server = fl_server.Server(client_manager=fl_server.SimpleClientManager(), strategy=strategy)
    if args.max_workers is not None:
        server.set_max_workers(args.max_workers)
    try:
        fl_server.start_server(
            server_address=args.address,
            server=server,
            config=fl_server.ServerConfig(num_rounds=args.rounds, round_timeout=args.timeout),
        )
    except BaseException:
        # An error inside start_server leaves its gRPC threads running, and the interpreter
        # would wait for them forever at exit: report and leave at once.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    return 0


def role_clients(args: argparse.Namespace) -> int:
    """Legacy engine: N flwr.client.start_client calls as threads of this process."""
    fl_client = importlib.import_module("flwr.client")
    errors: list[str] = []

    def one_client(i: int) -> None:
        try:
            fl_client.start_client(
                server_address=args.address,
                client=make_client().to_client(),
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


def _kill_me_with_parent() -> None:
    """In the flwr-serverapp/flwr-clientapp processes: die with the helper that started
    them. Their own parent monitor sends SIGINT, which a ServerApp blocked in a round
    does not act on, so a killed benchmark would leave it behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def deployment_server_app() -> Any:
    """Deployment engine: the ServerApp (legacy-compatible server_fn, same strategy)."""
    _kill_me_with_parent()
    fl_server = importlib.import_module("flwr.server")

    def server_fn(context: Any) -> Any:
        c = context.run_config
        rounds = int(c["rounds"])
        strategy = make_strategy(
            system="flower-deployment",
            clients=int(c["clients"]),
            rounds=rounds,
            model=str(c["model"]),
            wait_s=float(c["timeout"]),
            result_file=str(c["result-file"]),
        )
        config = fl_server.ServerConfig(num_rounds=rounds, round_timeout=float(c["timeout"]))
        return fl_server.ServerAppComponents(strategy=strategy, config=config)

    return fl_server.ServerApp(server_fn=server_fn)


def deployment_client_app() -> Any:
    """Deployment engine: the ClientApp."""
    _kill_me_with_parent()
    fl_client = importlib.import_module("flwr.client")
    return fl_client.ClientApp(client_fn=lambda context: make_client().to_client())


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
    p.add_argument(
        "--engine",
        choices=["legacy", "deployment"],
        default="legacy",
        help="legacy: start_server/start_client; deployment: SuperLink/SuperNodes/flwr run",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="spread the client threads over this many processes (default: 1)",
    )
    p.add_argument("--keep-logs", metavar="DIR", help="copy server/clients logs into DIR")
    # Internal: the roles run under the Flower venv's python.
    p.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine == "deployment" and (args.max_workers or args.client_processes != 1):
        p.error("--max-workers and --client-processes apply to --engine legacy only")
    if min(args.clients, args.rounds, args.client_processes) < 1 or args.timeout <= 0:
        p.error("--clients, --rounds and --client-processes must be >= 1, --timeout > 0")
    return args


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "server":
        return role_server(args)
    if args.role == "clients":
        return role_clients(args)
    # SIGTERM ends the run like Ctrl-C: every process started is stopped and reaped.
    signal.signal(signal.SIGTERM, _raise_exit)
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
