"""Durable server state besides the updates: the published global model, the
registered clients, and each round's cohort.

Every file is written atomically: temp file, fsync, rename, fsync of the
directory. The global model also keeps its previous version and carries a
content hash, so a corrupt or missing latest file falls back to the previous
one (whose round's updates are still in the spool, so nothing is lost: the
server re-aggregates them, bit for bit).

Does file I/O; must not import grpc.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from paramserver import codec
from paramserver.codec import Buffer
from paramserver.errors import DecodeError, ParamServerError
from paramserver.spool import fsync_dir
from paramserver.v1 import parameter_server_pb2 as pb

log = logging.getLogger("paramserver.state")

MODEL_MAGIC = b"PSMOD01\n"
MODEL_FILE = "global.model"
PREVIOUS_MODEL_FILE = "global.model.prev"
CLIENTS_FILE = "clients.json"
SERVER_STATE_PREFIX = "server-state."
RUN_FILE = "run.json"
LOCK_FILE = "lock"
# The enrolled clients (tokens.py): they outlive a run.
TOKENS_FILE = "tokens.json"


class StorageHealth:
    """Whether the state dir takes writes. The first failure after a success
    (and the first success after a failure) is logged and told to `listener`
    (the transport's health); the ones in between are not. Thread-safe."""

    def __init__(self, root: Path, listener: Callable[[bool], None] | None) -> None:
        self._root = root
        self._listener = listener
        self._ok = True
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        with self._lock:
            return self._ok

    def failed(self, what: str, error: OSError) -> None:
        if self._change(False):
            log.error("cannot write %s to %s (%s); refusing uploads with UNAVAILABLE until "
                      "the state dir takes writes again", what, self._root, error)

    def recovered(self) -> None:
        if self._change(True):
            log.warning("the state dir %s takes writes again", self._root)

    def _change(self, ok: bool) -> bool:
        # The listener is told under the lock: changes reach it in order.
        with self._lock:
            changed, self._ok = self._ok != ok, ok
            if changed and self._listener is not None:
                self._listener(ok)
        return changed


class StateDirError(ParamServerError):
    """The state dir cannot be used: locked by another server, or another run."""


@dataclass(frozen=True)
class StoredModel:
    header: codec.ModelHeader
    payload: bytes


def write_atomic(path: Path, data: bytes | Sequence[Buffer], durable: bool = True,
                 before_rename: Callable[[], None] | None = None) -> None:
    """`data` may be a list of pieces, written in order (no concatenated copy)."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError:  # a full disk: leave no partial file behind
        temp.unlink(missing_ok=True)
        raise
    if before_rename is not None:
        before_rename()
    os.replace(temp, path)
    if durable:
        fsync_dir(path.parent)


class StateDir:
    """The durable state of one server. `durable=False` skips the fsyncs (for
    tests and benchmarks that do not kill the machine)."""

    def __init__(self, root: Path, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        try:
            root.mkdir(parents=True, exist_ok=True)
            # One server per state dir: a second one would interleave two runs.
            self._lock = open(root / LOCK_FILE, "w")  # noqa: SIM115 - held until close()
        except OSError as error:
            raise StateDirError(f"cannot use {root} as the state dir: "
                                f"{error.strerror or error}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateDirError(f"state dir {root} is in use by another server") from None

    def close(self) -> None:
        """Releases the lock: the last thing a stopping server does."""
        self._lock.close()

    def clear(self) -> None:
        """Discards the run this dir holds (`serve --fresh`): everything but
        the lock, which this server holds, and the enrolled clients' tokens.
        Raises StateDirError for a dir that is neither empty nor a state dir
        (nothing else is ever deleted)."""
        entries = [p for p in self.root.iterdir() if p.name not in (LOCK_FILE, TOKENS_FILE)]
        if entries and not (self.root / RUN_FILE).exists():
            raise StateDirError(f"{self.root} is not a paramserver state dir (no {RUN_FILE}); "
                                "refusing to empty it for --fresh")
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def check_run(self, run: Mapping[str, object]) -> None:
        """Records what run this dir holds; raises StateDirError if it holds
        another one (a different initial model), so nothing is mixed."""
        path = self.root / RUN_FILE
        if path.exists():
            stored = read_json(path)
            if stored != dict(run):
                raise StateDirError(
                    f"state dir {self.root} holds another run ({stored}); use another "
                    "--state-dir, or --fresh to discard it")
            return
        self.write_json(path, dict(run))

    # -- global model ----------------------------------------------------------

    def save_model(self, header: codec.ModelHeader, payload: bytes | bytearray,
                   crash: Callable[[], None] | None = None) -> None:
        """Keeps the current file as the previous version, then installs the
        new one. A crash in between leaves the previous file, from which the
        server recovers. `crash` is a test hook run just before the renames."""
        data = _model_file(header, payload)
        current = self.root / MODEL_FILE

        def rotate() -> None:
            if crash is not None:
                crash()
            if current.exists():
                os.replace(current, self.root / PREVIOUS_MODEL_FILE)

        write_atomic(current, data, self.durable, before_rename=rotate)

    # -- the server optimizer's state ---------------------------------------------
    # One file per published round, written before that round's model, so
    # that whichever model a restart finds (the latest or, if it is corrupt,
    # the previous one) has its state beside it.

    def save_server_state(self, round: int, specs: codec.ModelSpec,
                          payload: bytes | bytearray) -> None:
        header = codec.ModelHeader(round, specs, hashlib.sha256(payload).digest())
        write_atomic(self._server_state_path(round), _model_file(header, payload),
                     self.durable)

    def load_server_state(self, round: int) -> StoredModel | None:
        """The state saved with the model of `round`; None if there is none.
        Raises DecodeError if it is corrupt."""
        path = self._server_state_path(round)
        return parse_model(path.read_bytes()) if path.exists() else None

    def drop_server_states_before(self, round: int) -> None:
        for path in self.root.glob(f"{SERVER_STATE_PREFIX}*"):
            number = path.name.removeprefix(SERVER_STATE_PREFIX)
            if number.isdigit() and int(number) < round:
                path.unlink(missing_ok=True)

    def _server_state_path(self, round: int) -> Path:
        return self.root / f"{SERVER_STATE_PREFIX}{round:08d}"

    def load_model(self) -> StoredModel | None:
        """The newest intact global model, or None if there is none."""
        for name in (MODEL_FILE, PREVIOUS_MODEL_FILE):
            path = self.root / name
            if not path.exists():
                continue
            try:
                return parse_model(path.read_bytes())
            except DecodeError as error:
                log.warning("global model file %s is corrupt (%s); trying the previous", path,
                            error)
        return None

    # -- clients and cohorts ---------------------------------------------------

    def save_clients(self, clients: Mapping[str, int]) -> None:
        write_atomic(self.root / CLIENTS_FILE, json.dumps(dict(clients)).encode(), self.durable)

    def load_clients(self) -> dict[str, int]:
        path = self.root / CLIENTS_FILE
        if not path.exists():
            return {}
        clients = read_json(path)
        if not isinstance(clients, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in clients.items()):
            raise corrupt(path, "not an object of client names to numbers")
        return clients

    def write_json(self, path: Path, value: object, durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(value).encode(), self.durable and durable)


def read_json(path: Path) -> object:
    """The JSON document in a state-dir file. StateDirError naming the file if
    it is not one (edited, or damaged on disk: every file is written
    atomically, so a crash alone never tears one)."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise corrupt(path, f"not JSON: {str(error)[:120]}") from None


def corrupt(path: Path, what: str) -> StateDirError:
    return StateDirError(f"{path} is corrupt ({what}); restore or remove it, or start "
                         "afresh with --fresh")


def _model_file(header: codec.ModelHeader, payload: bytes | bytearray) -> list[Buffer]:
    encoded = codec.model_header_to_proto(header).SerializeToString()
    return [MODEL_MAGIC + struct.pack("<I", len(encoded)) + encoded, payload]


def parse_model(data: bytes) -> StoredModel:
    """A global model file (or a server state file). Raises DecodeError."""
    head = len(MODEL_MAGIC) + 4
    if len(data) < head or not data.startswith(MODEL_MAGIC):
        raise DecodeError("not a global model file")
    (length,) = struct.unpack("<I", data[len(MODEL_MAGIC):head])
    header = codec.model_header_from_proto(
        codec.parse_message(pb.ModelHeader, data[head:head + length]))
    payload = data[head + length:]
    if len(payload) != codec.payload_size(header.specs):
        raise DecodeError(f"payload is {len(payload)} bytes, specs need "
                          f"{codec.payload_size(header.specs)}")
    if hashlib.sha256(payload).digest() != header.sha256:
        raise DecodeError("payload does not match its sha256")
    return StoredModel(header, payload)
