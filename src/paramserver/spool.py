"""Updates on disk, and the aggregation that streams them back.

Every update is written to its own file while it arrives (so the server holds
no client's parameters in memory) and is committed atomically: temp file,
optional fsync, rename. Aggregation then folds the committed files in canonical
order, one fixed-size block of one tensor at a time, into the new global
model's payload: memory is one payload plus O(block), whatever the number of
clients. The page cache keeps this close to memory speed.

Does file I/O; must not import grpc.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from paramserver.averaging import fold, weight_fractions
from paramserver.codec import ModelSpec, payload_size, tensor_view

BLOCK_BYTES = 4 << 20  # per input read; bounds aggregation memory beyond the output


@dataclass(frozen=True)
class SpooledUpdate:
    """A committed update: its file and its weight."""

    path: Path
    num_examples: int


class SpoolWriter:
    """One update being received: `write` while it streams in, `seal` when it is
    complete (flush and, if durable, fsync: slow, so done without the server's
    lock), then `commit` (an atomic rename: fast, done under the lock) or
    `discard`. `discard` after `commit` does nothing, so it can sit in `finally`.
    """

    def __init__(self, final: Path, durable: bool) -> None:
        self._final = final
        self._temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        self._durable = durable
        self._file = open(self._temp, "wb")  # noqa: SIM115 - closed in seal/discard
        self._committed = False

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def seal(self) -> None:
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())
        self._file.close()

    def commit(self) -> Path:
        os.replace(self._temp, self._final)
        self._committed = True
        if self._durable:
            _fsync_dir(self._final.parent)
        return self._final

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

    def writer(self, round: int, client_id: str) -> SpoolWriter:
        directory = self.root / f"round-{round:08d}"
        directory.mkdir(exist_ok=True)
        return SpoolWriter(directory / f"{client_id}.update", self.durable)

    def drop_round(self, round: int) -> None:
        shutil.rmtree(self.root / f"round-{round:08d}", ignore_errors=True)


def aggregate(specs: ModelSpec, updates: Sequence[SpooledUpdate],
              block_bytes: int = BLOCK_BYTES) -> bytearray:
    """The weighted average of the spooled updates (in the order given, which
    must be canonical) as a payload laid out by `specs`.

    Raises AveragingError for bad weights; OSError if a file is unreadable."""
    fractions = weight_fractions([u.num_examples for u in updates])
    out = bytearray(payload_size(specs))
    out_view = memoryview(out)
    files = [open(u.path, "rb") for u in updates]  # noqa: SIM115 - closed below
    try:
        fds = [f.fileno() for f in files]
        offset = 0
        for spec in specs:
            step = max(1, block_bytes // spec.dtype.itemsize) * spec.dtype.itemsize
            for start in range(offset, offset + spec.nbytes, step):
                size = min(step, offset + spec.nbytes - start)
                blocks = _read_blocks(fds, start, size, spec.dtype)
                result = fold(fractions, blocks, spec.dtype)
                out_view[start:start + size] = tensor_view(result)
            offset += spec.nbytes
    finally:
        for f in files:
            f.close()
    return out


def _read_blocks(fds: Sequence[int], start: int, size: int,
                 dtype: torch.dtype) -> Iterator[torch.Tensor]:
    # One buffer reused for every client: the fold consumes each block before
    # the next is read.
    buffer = bytearray(size)
    for fd in fds:
        got = os.preadv(fd, [buffer], start)
        if got != size:
            raise OSError(f"short read from update file: {got} of {size} bytes")
        yield torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
