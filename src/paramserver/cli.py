"""The `paramserver` command: `serve`, `client NAME`, `demo` and `bench`.

By hand, in separate terminals:
    paramserver serve --port 50051 --clients 2 --rounds 5 --fresh
    paramserver client client1 --server 127.0.0.1:50051
    paramserver client client2 --server 127.0.0.1:50051
or all at once, as real processes: `paramserver demo`.

Exit codes: 0 done; 1 a failure (a line says which); 2 a usage mistake (bad
value, port in use, unusable state dir); 3 a client that found its run already
finished; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import os

# gRPC's C core prints its own lines (a failed bind, say) beside ours, which
# already say what went wrong: quiet unless asked for. It reads the variable
# once, when grpc is first imported, so this runs before the imports below.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import json
import logging
import math
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from paramserver import (
    __version__,
    cli_security,
    codec,
    data,
    demo,
    errors,
    partition,
    processes,
    results,
    strategies,
    tasks,
    training,
)

log = logging.getLogger("paramserver")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_FAILURE, EXIT_USAGE, EXIT_RUN_FINISHED, EXIT_INTERRUPTED = 1, 2, 3, 130
DEFAULT_PORT = 50051
DEMO_WORKDIR = Path("paramserver-demo")
DEMO_MARKER = demo.DEMO_MARKER


class UsageError(Exception):
    """A mistake in what the user asked for: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """Errors in one line (not the usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help; descriptions as written."""


# -- value types: checked at parse time, each with a message naming the limit ----


def _number(convert: Callable[[str], float], low: float, what: str,
            ) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def _int_at_least(low: int) -> Callable[[str], int]:
    return _number(int, low, "an integer")  # type: ignore[return-value]


def _seconds(low: float = 0.0) -> Callable[[str], float]:
    return _number(float, low, "a number of seconds")


def _port(text: str) -> int:
    port = _int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


# -- the parser ----------------------------------------------------------------


def _common_parent() -> _Parser:
    # Accepted before and after the subcommand; after wins.
    parent = _Parser(add_help=False)
    parent.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS,
                        help=f"one of {', '.join(LOG_LEVELS)} (default: INFO)")
    parent.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="text, or one JSON object a line for machines (default: text)")
    parent.add_argument("--log-file", type=Path, default=argparse.SUPPRESS,
                        help="log here instead of to standard output")
    parent.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress display (it is off anyway when not on a terminal)")
    return parent


def _add_task_args(parser: argparse.ArgumentParser, *, client: bool = False) -> None:
    parser.add_argument("--task", default="mlp",
                        help="a built-in model (mlp, cnn, big) on --data, or your own task: "
                             "module:function, a function of a TaskContext returning a Task")
    parser.add_argument("--model", dest="task", choices=sorted(training.MODELS),
                        default=argparse.SUPPRESS, help="the same as --task for a built-in")
    parser.add_argument("--data", default="generated",
                        help="the built-in tasks' data: generated, digits, mnist:DIR or "
                             "fashion:DIR (the IDX files in DIR)")
    parser.add_argument("--partition", default="iid",
                        help="how real data is split among the clients: iid, "
                             "dirichlet:ALPHA, shards:PER_CLIENT or quantity:ALPHA")
    parser.add_argument("--seed", type=int, default=0, help="seeds model, data and training")
    if client:
        parser.add_argument("--index", type=_int_at_least(0), default=0,
                            help="this client's partition of the data (0-based)")
        parser.add_argument("--num-clients", type=_int_at_least(1), default=1,
                            help="the number of partitions the data is split into")


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=_seconds(0.0), default=0.1, help="learning rate")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=32, help="batch size")
    parser.add_argument("--epochs", type=_int_at_least(1), default=1, help="local epochs per round")
    parser.add_argument("--examples", type=_int_at_least(1), default=2000,
                        help="training examples")
    parser.add_argument("--chunk-size", type=_int_at_least(1), default=codec.DEFAULT_CHUNK_SIZE,
                        help=f"bytes per streamed chunk, at most {codec.MAX_CHUNK_SIZE}")
    parser.add_argument("--round-wait", type=_seconds(0.001), default=600.0,
                        help="seconds to wait at the barrier for a round to close before "
                             "re-syncing")
    parser.add_argument("--connect-timeout", type=_seconds(0.0), default=60.0,
                        help="seconds to keep retrying a server that does not answer, "
                             "then give up")
    parser.add_argument("--streaming", action="store_true",
                        help="always use the streaming RPCs, even for small models")


def _add_strategy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "strategy", "how updates become the global model (`paramserver strategies` lists "
        "each with its parameters, defaults and paper), client sampling and federated "
        "evaluation")
    group.add_argument("--strategy", default="fedavg", choices=list(strategies.CATALOGUE),
                       help="the aggregation strategy")
    for name, help_text in STRATEGY_PARAMETERS.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"param_{name}",
                           type=_number(float, 0.0, "a number"), default=None,
                           help=f"{help_text} (strategy's default when not given)")
    group.add_argument("--sample-fraction", type=_number(float, 0.0, "a fraction"),
                       help="train each round on this fraction of the available clients "
                            "(drawn from the seed, the round and their names)")
    group.add_argument("--sample-size", type=_int_at_least(1),
                       help="train each round on this many of the available clients")
    group.add_argument("--min-available", type=_int_at_least(0), default=0,
                       help="clients that must be active for a round after the first to "
                            "open; 0 = --min-clients")
    group.add_argument("--evaluate-every", type=_int_at_least(0), default=0,
                       help="federated evaluation of every k-th global model by a cohort of "
                            "clients on their held-out data; 0 = none")
    group.add_argument("--evaluate-fraction", type=_number(float, 0.0, "a fraction"),
                       default=1.0, help="the fraction of active clients that evaluate")


# Every parameter of every strategy, as an option of its own.
STRATEGY_PARAMETERS = {p.name: p.help for entry in strategies.CATALOGUE.values()
                       for p in entry.parameters}


ROUND_TIMEOUT_HELP = (
    "seconds a round waits for the rest of its cohort once its first update has arrived "
    "(an update sent before the round opened counts); then it closes with the updates it "
    "has if there are at least --min-clients, else it is aborted, and clients that sent "
    "nothing drop out until they register again. Counted from the first update, not from "
    "the opening, so a slow first round (cold start, large download) does not count "
    "against it: size it for the spread between the fastest and the slowest client. "
    "0 = wait for every client")


def build_parser() -> argparse.ArgumentParser:
    parent = _common_parent()
    parser = _Parser(prog="paramserver", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--log-level", type=_log_level, default="INFO",
                        help=f"one of {', '.join(LOG_LEVELS)}")
    parser.add_argument("--version", action="version", version=f"paramserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the parameter server", parents=[parent],
                           formatter_class=_Formatter)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    serve.add_argument("--unix-socket", type=Path,
                       help="listen on this unix socket instead of host:port "
                            "(clients use --server unix:PATH)")
    serve.add_argument("--clients", type=_int_at_least(1), default=2,
                       help="registered clients round 1 waits for")
    serve.add_argument("--min-clients", type=_int_at_least(1), default=1,
                       help="quorum: updates a round needs to close at its deadline (and "
                            "active clients a later round needs to open); at most --clients")
    serve.add_argument("--rounds", type=_int_at_least(0), default=0,
                       help="rounds to run, then serve the final model to the last clients "
                            "and exit 0; 0 = no limit")
    serve.add_argument("--round-timeout", type=_seconds(0.0), default=0.0,
                       help=ROUND_TIMEOUT_HELP)
    serve.add_argument("--linger", type=_seconds(0.0), default=30.0,
                       help="after the last round, seconds to keep serving the final model "
                            "to clients that have not fetched it yet")
    serve.add_argument("--capacity", type=_int_at_least(1), default=256,
                       help="most clients accepted; at least --clients")
    serve.add_argument("--chunk-size", type=_int_at_least(1), default=codec.DEFAULT_CHUNK_SIZE,
                       help=f"bytes per streamed chunk, at most {codec.MAX_CHUNK_SIZE}")
    serve.add_argument("--state-dir", type=Path, default=Path("paramserver-state"),
                       help="durable state: acknowledged updates, global models, clients; "
                            "a restarted server resumes from it")
    serve.add_argument("--fresh", action="store_true",
                       help="discard what --state-dir holds and start a new run")
    serve.add_argument("--no-fsync", action="store_true",
                       help="skip fsync (faster; a machine crash may lose acknowledged updates)")
    serve.add_argument("--ready-file", type=Path, help="write {port, pid} here once serving")
    serve.add_argument("--round-log", type=Path,
                       help="append one JSON line per round here (and CSV beside it); "
                            "default: metrics.jsonl in the state dir")
    serve.add_argument("--eval-examples", type=_int_at_least(0), default=2000,
                       help="test examples to evaluate each global model on; 0 = none")
    serve.add_argument("--config", type=Path,
                       help="a TOML file holding any of these options (keys as the option "
                            "names without dashes: clients = 8, strategy = \"fedadam\"); the "
                            "command line overrides it")
    _add_strategy_args(serve)
    _add_task_args(serve)
    cli_security.add_serve_args(serve)

    client = sub.add_parser("client", help="run one client", parents=[parent],
                            formatter_class=_Formatter)
    client.add_argument("name", help="client name, e.g. client1 (1-64 of A-Z a-z 0-9 . _ -)")
    client.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}",
                        help="host:port, or unix:PATH")
    client.add_argument("--rounds", type=_int_at_least(0), default=0,
                        help="stop after this round; 0 = the server's number of rounds")
    client.add_argument("--summary-file", type=Path, help="write per-round digests as JSON")
    _add_task_args(client, client=True)
    _add_client_args(client)
    cli_security.add_client_args(client)

    sub.add_parser("strategies", help="list the strategies, their parameters and papers",
                   parents=[parent], formatter_class=_Formatter)
    cli_security.add_commands(sub, parent, _Formatter)

    bench = sub.add_parser("bench", help="the side-by-side benchmark (source checkout only)",
                           parents=[parent], formatter_class=_Formatter)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="passed to benchmarks/bench.py (e.g. --quick)")

    demo = sub.add_parser("demo", help="run a server and N clients as real processes",
                          parents=[parent], formatter_class=_Formatter)
    demo.add_argument("--clients", type=_int_at_least(1), default=10, help="client processes")
    demo.add_argument("--rounds", type=_int_at_least(1), default=20, help="rounds")
    demo.add_argument("--workdir", type=Path, default=DEMO_WORKDIR,
                      help="logs, state and metrics (emptied first; kept afterwards)")
    _add_task_args(demo)
    demo.set_defaults(data="digits", partition="dirichlet:0.5")
    _add_client_args(demo)

    plot = sub.add_parser("plot", help="a PNG of loss and accuracy against rounds for runs",
                          parents=[parent], formatter_class=_Formatter)
    plot.add_argument("runs", nargs="+", type=Path,
                      help="run directories (holding metrics.jsonl: a state dir, a demo's "
                           "workdir) or round logs")
    plot.add_argument("--out", type=Path, default=Path("paramserver-runs.png"),
                      help="the PNG to write")
    plot.add_argument("--title", help="the chart's title")

    export = sub.add_parser("export", help="a global model as safetensors and a torch "
                            "state_dict", parents=[parent], formatter_class=_Formatter)
    export.add_argument("state_dir", type=Path, help="a server's state dir (not locked: a "
                        "running server goes on)")
    export.add_argument("out", type=Path, help="OUT.safetensors, OUT.pt, or OUT for both")
    export.add_argument("--round", type=_int_at_least(0),
                        help="which kept model (the latest or the one before); default latest")
    return parser


def strategy_from(args: argparse.Namespace) -> strategies.Strategy:
    """The strategy the options name. Raises UsageError."""
    given = {name: getattr(args, f"param_{name}") for name in STRATEGY_PARAMETERS
             if getattr(args, f"param_{name}", None) is not None}
    try:
        return strategies.build(args.strategy, given)
    except strategies.StrategyConfigError as error:
        raise UsageError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates, in one place: every mistake is one line and exit 2.
    `serve --config FILE` adds the file's options before the command line's."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _with_config_file(parser, argv)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"paramserver serve: error: {error}\n")
    args = parser.parse_args(argv)
    try:
        _validate(args)
    except cli_security.SetupError as error:
        prog = f"paramserver {args.command}"
        parser.exit(EXIT_USAGE, f"{prog}: error: {error} (see '{prog} --help')\n")
    except UsageError as error:
        prog = f"paramserver {args.command}"
        parser.exit(EXIT_USAGE, f"{prog}: error: {error} (see '{prog} --help')\n")
    return args


def _with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with the options of `serve --config FILE` inserted right after
    `serve`, so that the command line (later) overrides them."""
    if "serve" not in argv or "--config" not in argv[argv.index("serve"):]:
        return argv
    at = argv.index("--config", argv.index("serve"))
    if at + 1 >= len(argv):
        return argv  # argparse says what is missing
    path = Path(argv[at + 1])
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"--config {path}: {error}") from None
    serve = _subparser(parser, "serve")
    known = {a.dest.removeprefix("param_"): a for a in serve._actions if a.option_strings}
    extra: list[str] = []
    for key, value in values.items():
        action = known.get(key)
        if action is None or key in ("config", "help", "log_level"):
            raise UsageError(f"--config {path}: no option {key!r}")
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            extra += [flag] if value else []
        elif isinstance(value, int | float | str):
            extra += [flag, str(value)]
        else:
            raise UsageError(f"--config {path}: {key} must be a number, a string or a boolean")
    start = argv.index("serve") + 1
    return argv[:start] + extra + argv[start:]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choice: argparse.ArgumentParser = action.choices[name]
            return choice
    raise AssertionError(f"no subcommand {name}")


def _validate(args: argparse.Namespace) -> None:
    if args.command == "serve":
        strategy = strategy_from(args)
        need = strategy.min_updates
        if args.clients < need:
            raise UsageError(f"--strategy {strategy.name} needs at least {need} updates a "
                             f"round: --clients must be at least {need} (and the quorum, "
                             "--min-clients, is raised to it)")
        if args.sample_fraction is not None and args.sample_size is not None:
            raise UsageError("give --sample-fraction or --sample-size, not both")
        for name in ("sample_fraction", "evaluate_fraction"):
            value = getattr(args, name)
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if args.min_available and args.min_available < args.min_clients:
            raise UsageError(f"--min-available ({args.min_available}) is less than "
                             f"--min-clients ({args.min_clients})")
        if args.min_clients > args.clients:
            raise UsageError(f"--min-clients ({args.min_clients}) is more than --clients "
                             f"({args.clients})")
        if args.capacity < args.clients:
            raise UsageError(f"--capacity ({args.capacity}) is less than --clients "
                             f"({args.clients})")
        cli_security.validate_serve(args)
    if args.command == "client":
        cli_security.validate_client(args)
    for path in (getattr(args, "ready_file", None), getattr(args, "summary_file", None),
                 getattr(args, "round_log", None)):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{path}: no directory {path.parent}")
    if getattr(args, "chunk_size", 0) > codec.MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size is at most {codec.MAX_CHUNK_SIZE}, "
                         f"got {args.chunk_size}")


# -- entry points ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args)
    torch.set_num_threads(1)  # many processes share few cores; also keeps runs reproducible
    commands = {"serve": run_serve, "client": run_client, "demo": run_demo, "bench": run_bench,
                "strategies": run_strategies, "plot": run_plot, "export": run_export,
                "certs": cli_security.run_certs, "token": cli_security.run_token}
    try:
        return commands[args.command](args)
    except cli_security.SetupError as error:
        print(f"paramserver {args.command}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"paramserver {args.command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except UsageError as error:
        print(f"paramserver {args.command}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except errors.ParamServerError as error:
        print(f"paramserver {args.command}: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILURE


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "logger": record.name,
                 "level": record.levelname, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(args: argparse.Namespace) -> None:
    log_file = getattr(args, "log_file", None)
    handler: logging.Handler
    try:
        handler = (logging.FileHandler(log_file) if log_file is not None
                   else logging.StreamHandler(sys.stdout))
    except OSError as error:
        raise SystemExit(f"paramserver: error: --log-file {log_file}: {error.strerror}") from None
    handler.setFormatter(_JsonFormatter() if getattr(args, "log_format", "text") == "json"
                         else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])


def progress_on(args: argparse.Namespace) -> bool:
    """Live progress only on a terminal, and not with --quiet."""
    return not getattr(args, "quiet", False) and sys.stdout.isatty()


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
    from paramserver.config import ServerConfig
    from paramserver.sampling import Sampling
    from paramserver.server import BindError, create_server
    from paramserver.state import StateDirError

    server_task = _task(args)(tasks.TaskContext(None, 0, args.clients, args.seed))
    torch.manual_seed(args.seed)
    model = server_task.model()
    evaluator = (tasks.evaluator(server_task)
                 if args.eval_examples > 0 and server_task.test_data is not None else None)
    round_log = args.round_log or args.state_dir / "metrics.jsonl"
    progress = _Progress(args.rounds) if progress_on(args) else None
    stopping = threading.Event()
    failures: list[BaseException] = []
    finished = threading.Event()

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        stopping.set()

    def on_finished() -> None:
        finished.set()
        stopping.set()

    quorum = max(args.min_clients, strategy_from(args).min_updates)
    sampling = (Sampling(args.seed, args.sample_fraction, args.sample_size, quorum)
                if args.sample_fraction is not None or args.sample_size is not None else None)
    config = ServerConfig(
        clients=args.clients, total_rounds=args.rounds, capacity=args.capacity,
        round_timeout=args.round_timeout or None, min_clients=args.min_clients,
        chunk_size=args.chunk_size, state_dir=args.state_dir, durable=not args.no_fsync,
        round_log=round_log, evaluator=evaluator, linger=args.linger, fresh=args.fresh,
        on_failure=on_failure, on_finished=on_finished, strategy=strategy_from(args),
        on_record=progress.record if progress is not None else None,
        sampling=sampling, min_available=args.min_available,
        evaluate_every=args.evaluate_every,
        evaluation_sampling=Sampling(args.seed, args.evaluate_fraction, None, 1),
        tls=cli_security.server_tls(args), limits=cli_security.limits(args),
        secagg=cli_security.secagg_settings(args))
    cli_security.warn_if_insecure(args)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    address = f"unix:{args.unix_socket}" if args.unix_socket else f"{args.host}:{args.port}"
    try:
        running = create_server(config, model.state_dict(), address)
    except (BindError, StateDirError, errors.DecodeError) as error:
        raise UsageError(str(error)) from None
    del model  # the server keeps the payload; the module would double a large model
    if running.coordinator.finished:
        log.warning("state dir %s holds a run that has finished all its rounds: serving its "
                    "final model to late clients, then exiting (start a new run with --fresh "
                    "or another --state-dir)", args.state_dir)
    log.info("serving on %s (port %d, %s, authentication: %s), waiting for %d clients, %s "
             "rounds, state in %s", address, running.port,
             "TLS" if config.tls is not None else "plaintext", running.authentication,
             args.clients, args.rounds or "unlimited", args.state_dir)
    if args.ready_file:
        processes.write_ready_file(args.ready_file, running.port)
    stopping.wait()
    running.stop(grace=5.0)
    if progress is not None:
        progress.close()
    if failures:
        log.error("stopped after a failure; restart on the same --state-dir to resume")
        return EXIT_FAILURE
    log.info("stopped; state flushed to %s", args.state_dir)
    if finished.is_set():
        print(_finished_summary(running.coordinator.model.header, args.state_dir), flush=True)
    return 0


def _task(args: argparse.Namespace) -> tasks.TaskFactory:
    options = tasks.Builtin(args.task, args.data, args.partition,
                            getattr(args, "examples", 2000), getattr(args, "lr", 0.1),
                            getattr(args, "batch_size", 32), getattr(args, "epochs", 1),
                            test_examples=getattr(args, "eval_examples", 2000) or 2000)
    try:
        return tasks.factory(args.task, options)
    except tasks.TaskError as error:
        raise UsageError(str(error)) from None


class _Progress:
    """A bar over the rounds and one line per round, on a terminal."""

    def __init__(self, rounds: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=rounds or None, unit="round", leave=False, file=sys.stdout)

    def record(self, record: Mapping[str, Any]) -> None:
        if record.get("kind") == "evaluation":
            metrics = record["metrics"]
            self._bar.write(f"round {record['round']:>3}: federated evaluation by "
                            f"{record['clients']} clients: loss "
                            f"{metrics.get('loss', float('nan')):.4f}, accuracy "
                            f"{metrics.get('accuracy', float('nan')):.3f}")
            return
        self._bar.write(demo.round_line(dict(record)))
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _finished_summary(header: codec.ModelHeader, state_dir: Path) -> str:
    return (f"run finished: final global model of round {header.round}, sha256 "
            f"{header.sha256.hex()}, in {state_dir / 'global.model'}")


# -- client --------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> int:
    from paramserver.client import ParameterServerClient, RetryPolicy
    from paramserver.runner import RoundReport, run_client

    if not args.index < args.num_clients:
        raise UsageError(f"--index {args.index} is not below --num-clients {args.num_clients}")
    try:
        task = _task(args)(tasks.TaskContext(args.name, args.index, args.num_clients,
                                             args.seed))
    except (data.DataError, partition.PartitionError, tasks.TaskError) as error:
        raise UsageError(str(error)) from None
    retry = RetryPolicy(attempts=1_000_000, initial_backoff=0.1, max_backoff=2.0,
                        give_up_after=args.connect_timeout)

    def on_round(report: RoundReport) -> None:
        print(f"{report.client} round {report.round}: train loss "
              f"{report.metrics.get('loss', float('nan')):.4f}, "
              f"{report.received}/{report.expected or '?'} in", flush=True)

    with ParameterServerClient(args.server, chunk_size=args.chunk_size, retry=retry,
                               streaming=args.streaming,
                               credentials=cli_security.client_credentials(args)) as client:
        summary = run_client(client, task, args.name, rounds=args.rounds,
                             round_wait=args.round_wait, on_round=on_round,
                             save_quantized=args.save_quantized)
    if summary.finished_before_joining:
        print(f"{args.name}: the run at {args.server} has already finished all its "
              f"{summary.total_rounds} rounds; nothing to do", flush=True)
        return EXIT_RUN_FINISHED
    final = summary.rounds.get(max(summary.rounds)) if summary.rounds else None
    print(f"{args.name} done: global model sha256 {final or 'none'}", flush=True)
    if args.summary_file:
        args.summary_file.write_text(json.dumps({"client": args.name, "rounds": summary.rounds,
                                                 "evaluations": summary.evaluations}))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    try:
        return demo.run_demo(args, progress_on(args))
    except demo.DemoError as error:
        raise UsageError(str(error)) from None


def run_plot(args: argparse.Namespace) -> int:
    try:
        out = results.plot(args.runs, args.out, args.title)
    except results.ResultsError as error:
        raise UsageError(str(error)) from None
    print(f"wrote {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    try:
        written = results.export(args.state_dir, args.out, args.round)
    except results.ResultsError as error:
        raise UsageError(str(error)) from None
    print("wrote " + ", ".join(map(str, written)))
    return 0


def run_strategies(args: argparse.Namespace) -> int:
    print("\n".join(strategies.describe()))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    # The benchmarks compare against other servers and are not installed with
    # the package: they live beside it in a source checkout.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.exists():
        raise UsageError(f"paramserver bench runs from a source checkout (no {script})")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


