"""The `paramserver` command: `serve`, `client NAME` and `demo`.

By hand, in separate terminals:
    paramserver serve --port 50051 --clients 2
    paramserver client client1 --server 127.0.0.1:50051
    paramserver client client2 --server 127.0.0.1:50051
or all at once, as real processes: `paramserver demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

import torch

from paramserver import codec, errors, faults, processes, training

log = logging.getLogger("paramserver")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp", choices=sorted(training.MODELS))
    parser.add_argument("--seed", type=int, default=0, help="seeds model, data and training")


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--examples", type=int, default=2000, help="training examples")
    parser.add_argument("--chunk-size", type=int, default=codec.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--round-wait", type=float, default=600.0,
                        help="seconds to wait at the barrier for a round to close")
    parser.add_argument("--streaming", action="store_true",
                        help="always use the streaming RPCs, even for small models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paramserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the parameter server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--unix-socket", type=Path,
                       help="listen on this unix socket instead of host:port "
                            "(clients use --server unix:PATH)")
    serve.add_argument("--clients", type=int, default=2,
                       help="clients to wait for before round 1 (a round waits for all)")
    serve.add_argument("--rounds", type=int, default=0, help="rounds to run; 0 = no limit")
    serve.add_argument("--capacity", type=int, default=256, help="most clients accepted")
    serve.add_argument("--chunk-size", type=int, default=codec.DEFAULT_CHUNK_SIZE)
    serve.add_argument("--state-dir", type=Path, default=Path("paramserver-state"),
                       help="durable state: acknowledged updates, global models, clients; "
                            "a restarted server resumes from it (default: %(default)s)")
    serve.add_argument("--fresh", action="store_true",
                       help="discard what --state-dir holds and start a new run")
    serve.add_argument("--no-fsync", action="store_true",
                       help="skip fsync (faster; a machine crash may lose acknowledged updates)")
    serve.add_argument("--round-timeout", type=float, default=0.0,
                       help="seconds a round stays open; 0 = wait for every client")
    serve.add_argument("--min-clients", type=int, default=1,
                       help="updates a round needs to close at its deadline (quorum)")
    serve.add_argument("--ready-file", type=Path, help="write {port, pid} here once serving")
    serve.add_argument("--round-log", type=Path, help="append one JSON line per round here")
    serve.add_argument("--eval-examples", type=int, default=2000,
                       help="test examples to evaluate each global model on; 0 = none")
    _add_training_args(serve)

    client = sub.add_parser("client", help="run one client")
    client.add_argument("name", help="client name, e.g. client1")
    client.add_argument("--server", default="127.0.0.1:50051", help="host:port")
    client.add_argument("--rounds", type=int, default=0,
                        help="stop after this round; 0 = the server's number of rounds")
    client.add_argument("--summary-file", type=Path, help="write per-round digests as JSON")
    _add_training_args(client)
    _add_client_args(client)

    bench = sub.add_parser("bench", help="the side-by-side benchmark (source checkout only)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="passed to benchmarks/bench.py (e.g. --quick)")

    demo = sub.add_parser("demo", help="run a server and N clients as real processes")
    demo.add_argument("--clients", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--workdir", type=Path, help="keep logs here (default: temp)")
    _add_training_args(demo)
    _add_client_args(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)  # many processes share few cores; also keeps runs reproducible
    commands = {"serve": run_serve, "client": run_client, "demo": run_demo, "bench": run_bench}
    return commands[args.command](args)


def entry() -> NoReturn:
    """The `paramserver` command: `main`, then an exit that skips the
    interpreter's finalization. By then `serve` has stopped the server and made
    its state durable; tearing down gRPC's native threads during finalization
    can abort the process instead ("terminate called without an active
    exception", exit -6: seen twice in the SIGTERM chaos test)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- serve ---------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    from paramserver.coordinator import ServerConfig
    from paramserver.server import create_server

    model = training.build_model(args.model, args.seed)
    evaluator = (training.make_evaluator(args.model, args.seed, args.eval_examples)
                 if args.eval_examples > 0 else None)
    if args.fresh and args.state_dir.exists():
        shutil.rmtree(args.state_dir)
    stopping = threading.Event()
    failures: list[BaseException] = []

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        stopping.set()

    config = ServerConfig(
        min_clients=args.clients, total_rounds=args.rounds, capacity=args.capacity,
        round_timeout=args.round_timeout or None, quorum=args.min_clients,
        chunk_size=args.chunk_size, state_dir=args.state_dir, durable=not args.no_fsync,
        round_log=args.round_log, evaluator=evaluator, on_failure=on_failure)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    address = f"unix:{args.unix_socket}" if args.unix_socket else f"{args.host}:{args.port}"
    running = create_server(config, model.state_dict(), address)
    del model  # the server keeps the payload; the module would double a large model
    if running.coordinator.finished:
        running.stop(grace=0)
        log.error("state dir %s holds a run that has finished all its rounds; start a new "
                  "run with --fresh or another --state-dir", args.state_dir)
        return 2
    log.info("serving on %s (port %d), waiting for %d clients, %s rounds, state in %s",
             address, running.port, args.clients, args.rounds or "unlimited", args.state_dir)
    if args.ready_file:
        processes.write_ready_file(args.ready_file, running.port)
    stopping.wait()
    running.stop(grace=5.0)
    if failures:
        log.error("stopped after a failure; restart on the same --state-dir to resume")
        return 1
    log.info("stopped; state flushed to %s", args.state_dir)
    return 0


# -- client --------------------------------------------------------------------


MAX_RESYNCS = 20


def run_client(args: argparse.Namespace) -> int:
    from paramserver.client import ParameterServerClient, RetryPolicy

    config = training.TrainConfig(args.model, args.seed, args.examples, args.lr,
                                  args.batch_size, args.epochs)
    model = training.build_model(args.model, args.seed)
    data = training.make_dataset(args.seed, args.name, args.examples)
    digests: dict[int, str] = {}
    # Retries span a server restart: about a minute of backoff in all.
    retry = RetryPolicy(attempts=40, initial_backoff=0.1, max_backoff=2.0)
    with ParameterServerClient(args.server, chunk_size=args.chunk_size, retry=retry,
                               streaming=args.streaming) as client:
        reg = client.register(args.name)
        last = args.rounds or reg.total_rounds or 5
        model_round, round = reg.model_round, reg.first_round
        resyncs = 0
        sent: set[int] = set()  # rounds this client's update was acknowledged for
        while True:
            try:
                header, state = client.get_model(reg.client_id, model_round, args.round_wait)
                model.load_state_dict(state)
                if header.round in sent:
                    digests[header.round] = header.sha256.hex()
                if header.round >= last or round > last:
                    break
                loss = training.train(model, data, config, round, args.name)
                faults.maybe_crash("client_before_upload", round)
                ack = client.send_update(reg.client_id, round, model.state_dict(),
                                         len(data[0]), {"loss": loss})
                sent.add(round)
                faults.maybe_crash("client_after_upload", round)
                print(f"{args.name} round {round}: train loss {loss:.4f}, "
                      f"{ack.received}/{ack.expected} in", flush=True)
                model_round, round = round, round + 1
            except (errors.RoundError, errors.RoundAbortedError,
                    errors.UnknownClientError) as error:
                resyncs += 1
                if resyncs > MAX_RESYNCS:
                    raise
                print(f"{args.name}: {error}; re-syncing", flush=True)
                reg = client.register(args.name)
                model_round, round = reg.model_round, reg.first_round
    print(f"{args.name} done: global model sha256 {digests.get(last, 'none')}", flush=True)
    if args.summary_file:
        args.summary_file.write_text(json.dumps({"client": args.name, "rounds": digests}))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    # The benchmarks compare against other servers and are not installed with
    # the package: they live beside it in a source checkout.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.exists():
        log.error("paramserver bench runs from a source checkout (no %s)", script)
        return 2
    return subprocess.call([sys.executable, str(script), *args.bench_args])


# -- demo ----------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _demo_in(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="paramserver-demo-") as temp:
        return _demo_in(args, Path(temp))


def _demo_in(args: argparse.Namespace, workdir: Path) -> int:
    ready, round_log = workdir / "server.ready", workdir / "rounds.jsonl"
    common = ["--model", args.model, "--seed", str(args.seed)]
    started = time.monotonic()
    with open(workdir / "server.log", "wb") as server_log:
        server = processes.spawn(processes.paramserver_command(
            "serve", "--port", "0", "--clients", str(args.clients), "--rounds",
            str(args.rounds), "--ready-file", str(ready), "--round-log", str(round_log),
            "--state-dir", str(workdir / "state"), "--chunk-size", str(args.chunk_size),
            *common), server_log)
        clients = []
        try:
            port = processes.wait_for_ready_file(ready, server, timeout=60)
            print(f"server on 127.0.0.1:{port}; {args.clients} clients, {args.rounds} rounds; "
                  f"logs in {workdir}", flush=True)
            for i in range(1, args.clients + 1):
                clients.append(_spawn_demo_client(args, workdir, f"client{i}", port, common))
            codes = [c.wait(timeout=args.round_wait * args.rounds + 60) for c in clients]
        finally:
            for process in [*clients, server]:
                processes.stop(process)
    return _report(args, workdir, round_log, codes, time.monotonic() - started)


def _spawn_demo_client(args: argparse.Namespace, workdir: Path, name: str, port: int,
                       common: list[str]) -> subprocess.Popen[bytes]:
    log_file = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
    try:
        return processes.spawn(processes.paramserver_command(
            "client", name, "--server", f"127.0.0.1:{port}", "--summary-file",
            str(workdir / f"{name}.json"), "--lr", str(args.lr), "--batch-size",
            str(args.batch_size), "--epochs", str(args.epochs), "--examples",
            str(args.examples), "--chunk-size", str(args.chunk_size), *common), log_file)
    finally:
        log_file.close()


def _report(args: argparse.Namespace, workdir: Path, round_log: Path, codes: list[int],
            elapsed: float) -> int:
    rounds = [json.loads(line) for line in round_log.read_text().splitlines()] \
        if round_log.exists() else []
    print(f"{'round':>5} {'updates':>7} {'train loss':>10} {'test loss':>9} "
          f"{'test acc':>8} {'round ms':>8}  global model sha256")
    for r in rounds:
        m = r["metrics"]
        print(f"{r['round']:>5} {r['num_updates']:>7} {m.get('loss', float('nan')):>10.4f} "
              f"{m.get('eval_loss', float('nan')):>9.4f} {m.get('eval_accuracy', 0):>8.3f} "
              f"{1000 * (r['round_seconds'] or 0):>8.1f}  {r['sha256'][:16]}")
    summaries = [json.loads((workdir / f"client{i}.json").read_text())
                 for i in range(1, args.clients + 1) if (workdir / f"client{i}.json").exists()]
    finals = {s["rounds"].get(str(args.rounds)) for s in summaries}
    ok = (all(c == 0 for c in codes) and len(rounds) == args.rounds
          and len(summaries) == args.clients and finals == {rounds[-1]["sha256"]})
    final = rounds[-1]["sha256"] if rounds else "none"
    print(f"final model sha256: {final}")
    print(f"{'OK' if ok else 'FAILED'}: {len(rounds)} rounds, {args.clients} clients, "
          f"all clients agree on the final model: {len(finals) == 1}, {elapsed:.1f}s")
    return 0 if ok else 1
