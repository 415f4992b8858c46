"""The aggregation driver: a strategy (strategies.py) applied to one round's
updates, block by block, from an update store (the disk spool), with the
server optimizer's state.

Memory: one block of every update at a time per worker (blocks are sized so
that the K rows together stay near ROWS_BYTES), plus the new model's payload
and, with a server optimizer, the old and new state. Never O(clients x model).

Determinism: the strategy sees the rows in canonical order; every element gets
the same operations whatever the block size and the number of worker threads
(blocks start on the strategy's granule), so the result depends only on the
set of updates.

The optimizer state is a payload like a model's, laid out by `state_specs`:
one float64 tensor per (state name, float tensor of the model), so it is saved
and loaded like a model (state.py) and a resumed run is bit-identical.

Imports torch and the pure modules; the store does the I/O; no grpc.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from paramserver.averaging import StateDict, Weights, round_float, validate_state_dict
from paramserver.specs import (
    Buffer,
    ModelSpec,
    TensorSpec,
    payload_size,
    payload_views,
    spec_of,
    state_dict_from_payload,
    tensor_view,
)
from paramserver.strategies import Aggregation, Block, ServerOptimizer, Strategy

P = TypeVar("P", contravariant=True)
U = TypeVar("U")

# The K rows of one block together, per worker: keeps aggregation memory flat
# in the number of clients (a block gets smaller as clients get more).
ROWS_BYTES = 8 << 20
MAX_BLOCK_BYTES = 1 << 20  # 1 MiB per row keeps the float64 buffers near the cache
MIN_BLOCK_BYTES = 16 << 10
AGGREGATION_WORKERS = min(4, os.cpu_count() or 1)
PARALLEL_BYTES = 8 << 20  # below this payload size, threads cost more than they save


class UpdateStore(Protocol[P]):
    """Where a round's updates are kept (the disk spool; an in-memory store
    for simulation)."""

    def num_examples(self, update: P) -> int: ...

    def rows(self, updates: Sequence[P], byte_start: int, count: int,
             dtype: torch.dtype) -> torch.Tensor:
        """`count` elements of `dtype` from byte `byte_start` of every update's
        payload: a fresh (K, count) tensor, one row per update in the order
        given, aliased to nothing else. Raises OSError."""


def block_bytes_for(updates: int) -> int:
    return max(MIN_BLOCK_BYTES, min(MAX_BLOCK_BYTES, ROWS_BYTES // max(updates, 1)))


def state_specs(specs: ModelSpec, optimizer: ServerOptimizer | None) -> ModelSpec:
    """The layout of the optimizer's state: "<name>:<tensor>" in float64 for
    every state name and float tensor; empty without an optimizer."""
    if optimizer is None:
        return ()
    return tuple(TensorSpec(f"{name}:{spec.name}", torch.float64, spec.shape)
                 for spec in specs if spec.dtype.is_floating_point
                 for name in optimizer.state_names)


def initial_state(specs: ModelSpec, optimizer: ServerOptimizer | None,
                  model: Buffer) -> bytearray:
    """The state before the first round, for the model `model` (a payload)."""
    out = bytearray(payload_size(state_specs(specs, optimizer)))
    if optimizer is None:
        return out
    view, at = memoryview(out), 0
    for spec, offset in _with_offsets(specs):
        if not spec.dtype.is_floating_point:
            continue
        current = _tensor(model, offset, spec.numel, spec.dtype).to(torch.float64)
        for name in optimizer.state_names:
            value = optimizer.initial_state(name, current)
            view[at:at + value.numel() * 8] = tensor_view(value)
            at += value.numel() * 8
    return out


@dataclass(frozen=True)
class _Work:
    block: Block
    byte_start: int  # of the block in the payload
    state_starts: dict[str, int]  # of the block in the state payload, per state name


@dataclass
class Result:
    payload: bytearray
    state: bytearray


class Driver(Generic[U]):
    """One round's aggregation. `current` is the global model the round
    started from and `state` the optimizer's state after it (both payloads)."""

    def __init__(self, specs: ModelSpec, strategy: Strategy, store: UpdateStore[U],
                 updates: Sequence[U], current: Buffer, state: Buffer,
                 block_bytes: int | None = None, workers: int | None = None) -> None:
        self._specs, self._strategy, self._store = specs, strategy, store
        self._updates = updates
        self._weights = Weights.of([store.num_examples(u) for u in updates])
        self._current, self._state = current, state
        self._block_bytes = block_bytes or block_bytes_for(len(updates))
        if workers is None:
            workers = AGGREGATION_WORKERS if payload_size(specs) >= PARALLEL_BYTES else 1
        self._workers = workers

    def run(self) -> Result:
        """Raises AveragingError (bad weights, too few updates for the strategy),
        OSError (the store cannot be read)."""
        aggregation = self._strategy.aggregation(len(self._updates))
        work = list(self._work(aggregation.granule))
        for _ in range(aggregation.passes - 1):  # in order: observing may accumulate
            for item in work:
                aggregation.observe(item.block, self._rows(item))
        if aggregation.passes > 1:
            aggregation.ready()
        result = Result(bytearray(payload_size(self._specs)), bytearray(len(self._state)))
        self._map(lambda item: self._combine(aggregation, item, result), work)
        return result

    def _combine(self, aggregation: Aggregation, item: _Work, result: Result) -> None:
        block, dtype = item.block, item.block.tensor.dtype
        value = aggregation.combine(block, self._rows(item), self._weights)
        optimizer = self._strategy.optimizer
        if dtype.is_floating_point and optimizer is not None:
            current = _tensor(self._current, item.byte_start, block.count, dtype)
            state = {name: _tensor(self._state, at, block.count, torch.float64).clone()
                     for name, at in item.state_starts.items()}
            value = optimizer.step(current.to(torch.float64), value, state)
            for name, at in item.state_starts.items():
                _write(result.state, at, state[name])
        if dtype.is_floating_point:
            value = round_float(value, dtype)
        _write(result.payload, item.byte_start, value.to(dtype))

    def _rows(self, item: _Work) -> torch.Tensor:
        return self._store.rows(self._updates, item.byte_start, item.block.count,
                                item.block.tensor.dtype)

    def _work(self, granule: int) -> Iterator[_Work]:
        state_names = self._strategy.optimizer.state_names if self._strategy.optimizer else ()
        state_at = 0
        for spec, offset in _with_offsets(self._specs):
            per_block = max(granule, self._block_bytes // spec.dtype.itemsize // granule * granule)
            floats = spec.dtype.is_floating_point and bool(state_names)
            for start in range(0, spec.numel, per_block):
                count = min(per_block, spec.numel - start)
                states = ({n: state_at + (i * spec.numel + start) * 8
                           for i, n in enumerate(state_names)} if floats else {})
                yield _Work(Block(spec, start, count), offset + start * spec.dtype.itemsize,
                            states)
            if floats:
                state_at += len(state_names) * spec.numel * 8

    def _map(self, run: Callable[[_Work], None], work: list[_Work]) -> None:
        if self._workers <= 1 or len(work) <= 1:
            for item in work:
                run(item)
            return
        pool = concurrent.futures.ThreadPoolExecutor(min(self._workers, len(work)))
        try:
            for _ in pool.map(run, work):
                pass  # re-raises the first error
        finally:  # on an error, the blocks not started yet are not
            pool.shutdown(wait=True, cancel_futures=True)


def _with_offsets(specs: ModelSpec) -> Iterator[tuple[TensorSpec, int]]:
    offset = 0
    for spec in specs:
        yield spec, offset
        offset += spec.nbytes


def _tensor(payload: Buffer, byte_start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    raw = memoryview(payload)[byte_start:byte_start + count * dtype.itemsize]
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


def _write(out: bytearray, byte_start: int, value: torch.Tensor) -> None:
    view = tensor_view(value)
    memoryview(out)[byte_start:byte_start + len(view)] = view


# -- in memory: for simulation and for checking strategies against their papers --------


@dataclass(frozen=True)
class MemoryUpdate:
    num_examples: int
    payload: Buffer


class MemoryStore:
    """The update store over payloads held in memory."""

    def num_examples(self, update: MemoryUpdate) -> int:
        return update.num_examples

    def rows(self, updates: Sequence[MemoryUpdate], byte_start: int, count: int,
             dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty((len(updates), count), dtype=dtype)
        for row, update in zip(out, updates, strict=True):
            row.copy_(_tensor(update.payload, byte_start, count, dtype))
        return out


def aggregate_in_memory(strategy: Strategy, updates: Mapping[str, tuple[int, StateDict]],
                        current: StateDict, state: Buffer | None = None,
                        block_bytes: int | None = None, workers: int = 1,
                        ) -> tuple[dict[str, torch.Tensor], bytearray]:
    """One round of `strategy` over in-memory updates keyed by client id
    (visited in sorted order), from the global model `current` and the
    optimizer state after it (None: the initial state). Returns the new
    global model and state. Raises what Driver.run raises, and
    MalformedUpdateError for updates that do not match `current`."""
    specs = spec_of(current)
    for client in updates:
        validate_state_dict(updates[client][1], specs)
    ordered = [MemoryUpdate(updates[c][0], b"".join(payload_views(updates[c][1])))
               for c in sorted(updates)]
    model = b"".join(payload_views(current))
    if state is None:
        state = initial_state(specs, strategy.optimizer, model)
    result = Driver(specs, strategy, MemoryStore(), ordered, model, state,
                    block_bytes=block_bytes, workers=workers).run()
    return state_dict_from_payload(specs, result.payload), result.state
