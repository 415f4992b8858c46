"""The floor: a minimal hand-written grpcio parameter server, for comparison only.

One unary RPC per client per round carries the raw float32 bytes of the whole
model up and the average back; a condition variable is the barrier; the sum is
kept in one float32 tensor. No validation, no durability, no chunking (message
limits raised instead), no determinism: the least a gRPC server in Python can
do per round. Not part of the package.

    python benchmarks/floor.py serve --clients N --ready-file F
    python benchmarks/floor.py load --server 127.0.0.1:PORT --clients N --rounds R --model mlp
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import model_numel, round_periods, tensor_bytes

METHOD = "/floor.Floor/Exchange"
LIMITS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


class Barrier:
    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.cond = threading.Condition()
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.round = 0
        self.result = b""

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        update = torch.frombuffer(bytearray(request), dtype=torch.float32)
        with self.cond:
            my_round = self.round
            if self.sum is None:
                self.sum = update.clone()
            else:
                self.sum += update
            self.count += 1
            if self.count == self.clients:
                self.result = tensor_bytes(self.sum / self.clients)
                self.sum, self.count, self.round = None, 0, self.round + 1
                self.cond.notify_all()
            while self.round == my_round:
                self.cond.wait()
            return self.result


def serve(args: argparse.Namespace) -> int:
    barrier = Barrier(args.clients)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=args.clients + 8),
                         options=LIMITS)
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        barrier.exchange)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "floor.Floor", {"Exchange": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    temp = args.ready_file.with_suffix(".tmp")
    temp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(temp, args.ready_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


def load(args: argparse.Namespace) -> int:
    """N client threads; prints per-round periods as JSON."""
    numel = model_numel(args.model)
    done: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            with grpc.insecure_channel(args.server, options=LIMITS) as channel:
                call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
                model = torch.zeros(numel)
                for _ in range(args.rounds):
                    update = model + 0.001
                    reply = call(tensor_bytes(update), timeout=600)
                    model = torch.frombuffer(bytearray(reply), dtype=torch.float32)
                    done[i].append(time.perf_counter())
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(json.dumps({"errors": errors}), file=sys.stderr)
        return 1
    print(json.dumps({"round_seconds": round_periods(done)}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--ready-file", type=Path, required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--server", required=True)
    ld.add_argument("--clients", type=int, required=True)
    ld.add_argument("--rounds", type=int, required=True)
    ld.add_argument("--model", default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    return serve(args) if args.command == "serve" else load(args)


if __name__ == "__main__":
    sys.exit(main())
