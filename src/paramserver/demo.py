"""`paramserver demo`: a server and N clients as real processes on a free
port, the server's round log followed live (one line per round, with a
progress bar on a terminal), then the accuracy curve, the final digest and a
check that every client ended with the server's final model.

Default: scikit-learn's handwritten digits, 10 clients on a Dirichlet(0.5)
split, 20 rounds. The same seed gives the same digest, run after run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from paramserver import errors, processes

DEMO_MARKER = ".paramserver-demo"
METRICS = "metrics.jsonl"


class DemoError(errors.ParamServerError):
    """The demo cannot run where it was asked to (its workdir)."""


def run_demo(args: argparse.Namespace, progress: bool) -> int:
    workdir: Path = args.workdir
    prepare_workdir(workdir)
    ready, round_log = workdir / "server.ready", workdir / METRICS
    common = task_options(args)
    started = time.monotonic()
    with open(workdir / "server.log", "wb") as server_log:
        server = processes.spawn(processes.paramserver_command(
            "serve", "--port", "0", "--clients", str(args.clients), "--rounds",
            str(args.rounds), "--ready-file", str(ready), "--round-log", str(round_log),
            "--state-dir", str(workdir / "state"), "--chunk-size", str(args.chunk_size),
            "--quiet", *common), server_log)
        clients: list[subprocess.Popen[bytes]] = []
        try:
            try:
                port = processes.wait_for_ready_file(ready, server, timeout=60)
            except (RuntimeError, TimeoutError) as error:
                raise errors.ParamServerError(
                    f"the demo's server did not start ({error}); see {workdir / 'server.log'}"
                    ) from None
            print(f"server on 127.0.0.1:{port}; {args.clients} clients, {args.rounds} rounds, "
                  f"{args.data} data ({args.partition}); logs in {workdir}", flush=True)
            for i in range(args.clients):
                clients.append(_spawn_client(args, workdir, i, port, common))
            codes = _follow(args, clients, round_log, progress)
        finally:
            for process in [*clients, server]:
                processes.stop(process)
    return _report(args, workdir, round_log, codes, time.monotonic() - started)


def task_options(args: argparse.Namespace) -> list[str]:
    return ["--task", args.task, "--data", args.data, "--partition", args.partition,
            "--seed", str(args.seed)]


def prepare_workdir(workdir: Path) -> None:
    """An empty workdir, every run (the same seed gives the same digest). Only
    a directory an earlier demo made (it holds DEMO_MARKER) is emptied: any
    other non-empty one is refused, never deleted."""
    if workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--workdir {workdir} is not a directory")
    if workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).exists():
            raise DemoError(f"--workdir {workdir} holds files the demo did not make; "
                            "choose an empty or new directory")
        try:
            shutil.rmtree(workdir)
        except OSError as error:
            raise DemoError(f"cannot empty --workdir {workdir}: {error}") from None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / DEMO_MARKER).write_text("made by paramserver demo; emptied by the next\n")
    except OSError as error:
        raise DemoError(f"cannot use --workdir {workdir}: {error}") from None


def _spawn_client(args: argparse.Namespace, workdir: Path, index: int, port: int,
                  common: list[str]) -> subprocess.Popen[bytes]:
    name = f"client{index + 1}"
    log_file = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
    try:
        return processes.spawn(client_command(args, workdir, index, port, common), log_file)
    finally:
        log_file.close()


def client_command(args: argparse.Namespace, workdir: Path, index: int, port: int,
                   common: list[str]) -> list[str]:
    """A demo client: every client option of `demo` passed on."""
    name = f"client{index + 1}"
    streaming = ["--streaming"] if args.streaming else []
    return processes.paramserver_command(
        "client", name, "--server", f"127.0.0.1:{port}", "--summary-file",
        str(workdir / f"{name}.json"), "--index", str(index), "--num-clients",
        str(args.clients), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs), "--examples", str(args.examples), "--chunk-size",
        str(args.chunk_size), "--round-wait", str(args.round_wait), "--connect-timeout",
        str(args.connect_timeout), *streaming, *common)


def _follow(args: argparse.Namespace, clients: list[subprocess.Popen[bytes]], round_log: Path,
            progress: bool) -> list[int]:
    """Waits for the clients, printing each round as the server logs it."""
    deadline = time.monotonic() + args.round_wait * args.rounds + 60
    bar = _bar(args.rounds) if progress else None
    shown = 0
    while True:
        records = _training_records(round_log)
        for record in records[shown:]:
            if bar is not None:
                bar.write(round_line(record))
                bar.update(1)
        shown = len(records)
        if all(c.poll() is not None for c in clients):
            break
        if time.monotonic() > deadline:
            raise errors.ParamServerError(f"the demo's clients did not finish in time; logs in "
                                          f"{round_log.parent}")
        time.sleep(0.2)
    if bar is not None:
        bar.close()
    return [c.wait() for c in clients]


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="round", leave=False, file=sys.stdout)


def _training_records(round_log: Path) -> list[dict[str, Any]]:
    if not round_log.exists():
        return []
    text = round_log.read_text()
    lines = text[:text.rfind("\n") + 1].splitlines()  # a line being written is not read
    return [r for r in map(json.loads, lines) if r.get("kind") != "evaluation"]


def round_line(record: dict[str, Any]) -> str:
    m = record["metrics"]
    return (f"round {record['round']:>3}: {record['num_updates']} updates, train loss "
            f"{m.get('loss', float('nan')):.4f}, test loss {m.get('eval_loss', float('nan')):.4f},"
            f" test accuracy {m.get('eval_accuracy', float('nan')):.3f}")


def _report(args: argparse.Namespace, workdir: Path, round_log: Path, codes: list[int],
            elapsed: float) -> int:
    rounds = _training_records(round_log)
    print(f"{'round':>5} {'updates':>7} {'train loss':>10} {'test loss':>9} "
          f"{'test acc':>8} {'round ms':>8}  global model sha256")
    for r in rounds:
        m = r["metrics"]
        print(f"{r['round']:>5} {r['num_updates']:>7} {m.get('loss', float('nan')):>10.4f} "
              f"{m.get('eval_loss', float('nan')):>9.4f} {m.get('eval_accuracy', 0):>8.3f} "
              f"{1000 * (r['round_seconds'] or 0):>8.1f}  {r['sha256']}")
    summaries = [json.loads((workdir / f"client{i}.json").read_text())
                 for i in range(1, args.clients + 1) if (workdir / f"client{i}.json").exists()]
    finals = {s["rounds"].get(str(args.rounds)) for s in summaries}
    ok = (all(c == 0 for c in codes) and len(rounds) == args.rounds
          and len(summaries) == args.clients and finals == {rounds[-1]["sha256"]})
    final = rounds[-1]["sha256"] if rounds else "none"
    print(f"final model sha256: {final}")
    print(f"{'OK' if ok else 'FAILED'}: {len(rounds)} rounds, {args.clients} clients, "
          f"all clients agree on the final model: {len(finals) == 1}, {elapsed:.1f}s; "
          f"logs and metrics in {workdir}")
    return 0 if ok else 1
