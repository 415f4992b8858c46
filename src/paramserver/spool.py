"""Updates on disk: written while they arrive, read back block by block.

Every update is written to its own file while it arrives (so the server holds
no client's parameters in memory) and is committed atomically: temp file,
optional fsync, rename. Aggregation (aggregation.py) then reads the committed
files through a SpoolReader, one block of every update at a time: memory is
one payload plus O(clients x block), whatever the model size. The page cache
keeps this close to memory speed.

Does file I/O; must not import grpc.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from paramserver import codec
from paramserver.aggregation import Driver
from paramserver.codec import ModelSpec, payload_size, tensor_view
from paramserver.errors import DecodeError, MalformedUpdateError
from paramserver.strategies import FedAvg
from paramserver.v1 import parameter_server_pb2 as pb

log = logging.getLogger("paramserver.spool")

# An update file: magic, u32 little-endian header length, the UpdateHeader as
# protobuf, then the payload. The header travels in the same file so that one
# atomic rename makes the whole acknowledged update durable.
UPDATE_MAGIC = b"PSUPD01\n"



@dataclass(frozen=True)
class SpooledUpdate:
    """A committed update: its file, where its payload starts, its header."""

    path: Path
    offset: int
    header: codec.UpdateHeader

    @property
    def num_examples(self) -> int:
        return self.header.num_examples


class SpoolWriter:
    """One update being received: `write` while it streams in, `seal` when it is
    complete (flush and, if durable, fsync: slow, so done without the server's
    lock), then `commit` (an atomic rename: fast, done under the lock; the
    directory's fsync is `Spool.sync_round`, again without the lock), or
    `discard`.
    `discard` after `commit` does nothing, so it can sit in `finally`.
    """

    def __init__(self, final: Path, header: codec.UpdateHeader, durable: bool) -> None:
        self._final = final
        self._temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        self._durable = durable
        self._header = header
        self._file = open(self._temp, "wb")  # noqa: SIM115 - closed in seal/discard
        self._committed = False
        encoded = codec.update_header_to_proto(header).SerializeToString()
        self._offset = len(UPDATE_MAGIC) + 4 + len(encoded)
        self._file.write(UPDATE_MAGIC + struct.pack("<I", len(encoded)) + encoded)

    def write(self, data: codec.Buffer) -> None:
        self._file.write(data)

    def seal(self) -> None:
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())
        self._file.close()

    def commit(self) -> SpooledUpdate:
        """The rename: the update is in its round from here on. Not yet durable
        (see `Spool.sync_round`), so that the caller's lock is not held over an
        fsync."""
        os.replace(self._temp, self._final)
        self._committed = True
        return SpooledUpdate(self._final, self._offset, self._header)

    def discard(self) -> None:
        if self._committed:
            return
        self._file.close()
        self._temp.unlink(missing_ok=True)


class Spool:
    """The directory of update files, one sub-directory per round."""

    def __init__(self, root: Path, durable: bool = False) -> None:
        self.root = root
        self.durable = durable
        root.mkdir(parents=True, exist_ok=True)

    def round_dir(self, round: int) -> Path:
        return self.root / f"round-{round:08d}"

    def aborted_marker(self, round: int) -> Path:
        """Marks an aborted round; kept beside, not in, the dropped round dir."""
        return self.root / f"round-{round:08d}.aborted"

    def writer(self, header: codec.UpdateHeader) -> SpoolWriter:
        directory = self.round_dir(header.round)
        directory.mkdir(exist_ok=True)
        return SpoolWriter(directory / f"{header.client_id}.update", header, self.durable)

    def sync_round(self, round: int) -> None:
        """Makes every rename into the round's directory durable: call after
        `SpoolWriter.commit`, before acknowledging. Nothing to do if the spool
        is not durable or the directory is gone (a round's directory goes once
        the next model is published, when its updates no longer matter)."""
        if self.durable:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(self.round_dir(round))

    def drop_round(self, round: int) -> None:
        """Removes a round's directory, if there is one. A round directory holds
        only files, so a scandir and unlinks do (rmtree costs several times
        more, per round, on the hot path)."""
        directory = self.round_dir(round)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    os.unlink(entry.path)
            os.rmdir(directory)
        except FileNotFoundError:
            return
        except OSError:  # something unexpected in it: remove whatever is there
            shutil.rmtree(directory, ignore_errors=True)

    def drop_rounds_before(self, round: int) -> None:
        """Round dirs and abort markers of earlier rounds."""
        for path in self.root.glob("round-*"):
            number = path.name.removeprefix("round-").removesuffix(".aborted")
            if not number.isdigit() or int(number) >= round:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def load_round(self, round: int, specs: ModelSpec) -> list[SpooledUpdate]:
        """The committed updates of `round`, each checked against its digest.
        A file that fails the check cannot have been acknowledged (the ack
        follows the rename, which follows the fsync); it is removed."""
        directory = self.round_dir(round)
        found = []
        for path in sorted(directory.glob("*.update")) if directory.is_dir() else []:
            try:
                found.append(read_update(path, specs))
            except (DecodeError, OSError) as error:
                log.warning("discarding unreadable update file %s: %s", path, error)
                path.unlink(missing_ok=True)
        for temp in directory.glob(".*.part") if directory.is_dir() else []:
            temp.unlink(missing_ok=True)  # an upload that never completed
        return found


def read_update_header(path: Path) -> codec.UpdateHeader:
    """The header of an update file, its payload unread. Raises DecodeError, OSError."""
    with open(path, "rb") as f:
        return _read_header(f, path)[0]


def read_update(path: Path, specs: ModelSpec) -> SpooledUpdate:
    """Parses and verifies an update file. Raises DecodeError, OSError."""
    with open(path, "rb") as f:
        header, offset = _read_header(f, path)
        try:
            codec.check_specs_match(header.specs, specs)
        except MalformedUpdateError as error:  # as any other corrupt file: discarded
            raise DecodeError(f"{path.name}: {error}") from None
        digest = hashlib.sha256()
        size = 0
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if size != payload_size(specs) or digest.digest() != header.sha256:
        raise DecodeError(f"{path.name}: payload does not match its header")
    return SpooledUpdate(path, offset, header)


def _read_header(f: BinaryIO, path: Path) -> tuple[codec.UpdateHeader, int]:
    prefix = f.read(len(UPDATE_MAGIC) + 4)
    if len(prefix) != len(UPDATE_MAGIC) + 4 or not prefix.startswith(UPDATE_MAGIC):
        raise DecodeError(f"{path.name}: not an update file")
    (length,) = struct.unpack("<I", prefix[len(UPDATE_MAGIC):])
    header = codec.update_header_from_proto(
        codec.parse_message(pb.UpdateHeader, f.read(length)))
    return header, len(prefix) + length


class SpoolReader:
    """The update store over committed update files (aggregation.UpdateStore):
    opens each file once; use as a context manager."""

    def __init__(self, updates: Sequence[SpooledUpdate]) -> None:
        self._files: dict[Path, BinaryIO] = {}
        try:
            for update in updates:
                self._files[update.path] = open(update.path, "rb")  # noqa: SIM115
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def num_examples(self, update: SpooledUpdate) -> int:
        return update.num_examples

    def rows(self, updates: Sequence[SpooledUpdate], byte_start: int, count: int,
             dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty((len(updates), count), dtype=dtype)
        size = count * dtype.itemsize
        for row, update in zip(out, updates, strict=True):
            if not size:
                continue
            got = os.preadv(self._files[update.path].fileno(), [tensor_view(row)],
                            update.offset + byte_start)
            if got != size:
                raise OSError(f"short read from {update.path.name}: {got} of {size} bytes")
        return out


def aggregate(specs: ModelSpec, updates: Sequence[SpooledUpdate],
              block_bytes: int | None = None, workers: int | None = None) -> bytearray:
    """The weighted average (FedAvg) of the spooled updates, in the order
    given (canonical), as a payload laid out by `specs`. Raises
    AveragingError for bad weights; OSError if a file is unreadable."""
    with SpoolReader(updates) as reader:
        return Driver(specs, FedAvg(), reader, updates, b"", b"", block_bytes=block_bytes,
                      workers=workers).run().payload


def fsync_dir(path: Path) -> None:
    """Makes a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
