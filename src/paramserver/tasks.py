"""Task factories: what the command line's `--task` names, built-in or yours.

A task factory takes a TaskContext (which client it builds for, None on the
server; the client's index among `clients`, for partitions; the seed) and
returns a Task. `--task module:function` imports yours; `mlp`, `cnn` and
`big` are built in, on `--data` (generated, digits, mnist:DIR, fashion:DIR)
split by `--partition` (iid, dirichlet:ALPHA, shards:K, quantity:ALPHA).

The server calls the factory with client None: it needs the model (the
initial global model) and the test data (its own evaluation of each model).

Imports torch, task, training, data, partition; no grpc.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from paramserver import data as datasets
from paramserver import partition, training
from paramserver.task import Task


@dataclass(frozen=True)
class TaskContext:
    """`client`: the client's name (None: the server builds the task for its
    model and test data); `index` of `clients`: which partition is its own."""

    client: str | None = None
    index: int = 0
    clients: int = 1
    seed: int = 0


TaskFactory = Callable[[TaskContext], Task]


class TaskError(ValueError):
    """A task that cannot be built (unknown name, a factory that fails to import)."""


@dataclass(frozen=True)
class Builtin:
    """The built-in tasks' options (the command line's)."""

    model: str = "mlp"
    data: str = "generated"
    partition: str = "iid"
    examples: int = 2000  # per client, of generated data
    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 1
    held_out: float = 0.2  # of a client's partition of real data, for its evaluation
    test_examples: int = 2000  # the server's test set of generated data

    def __call__(self, ctx: TaskContext) -> Task:
        if self.data == "generated":
            return self._generated(ctx)
        dataset = datasets.load(self.data, ctx.seed)
        return self._partitioned(ctx, dataset)

    def _generated(self, ctx: TaskContext) -> Task:
        if ctx.client is None:  # the server: the seed's test set
            test = training.make_dataset(ctx.seed, "<test set>", self.test_examples, self.model)
            return self._task(ctx, lambda: training.build_model(self.model, ctx.seed),
                              TensorDataset(*test), TensorDataset(*test))
        return training.builtin_task(self.model, ctx.seed, ctx.client, self.examples, self.lr,
                                     self.batch_size, self.epochs)

    def _partitioned(self, ctx: TaskContext, dataset: datasets.Dataset) -> Task:
        def model() -> nn.Module:
            return training.build_model(self.model, ctx.seed, dataset.features, dataset.classes)

        if ctx.client is None:
            return self._task(ctx, model, dataset.train, dataset.test)
        if not 0 <= ctx.index < ctx.clients:
            raise TaskError(f"client index {ctx.index} is not in 0..{ctx.clients - 1}")
        labels = dataset.train_labels.tolist()
        parts = partition.parse(self.partition)(labels, ctx.clients, ctx.seed)
        train, held_out = split(parts[ctx.index], self.held_out, ctx.seed, ctx.index)
        return self._task(ctx, model, datasets.subset(dataset.train, train),
                          datasets.subset(dataset.train, held_out or train))

    def _task(self, ctx: TaskContext, model: Callable[[], nn.Module], train: TensorDataset,
              test: TensorDataset) -> Task:
        return Task(model=model, train_data=train, test_data=test, lr=self.lr,
                    batch_size=self.batch_size, epochs=self.epochs, seed=ctx.seed)


def split(indices: Sequence[int], fraction: float, seed: int,
          index: int) -> tuple[list[int], list[int]]:
    """A client's partition cut into (train, held-out), the held-out part
    `fraction` of it, drawn from (seed, index)."""
    order = list(indices)
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    shuffled = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    cut = int(len(shuffled) * fraction) if len(shuffled) > 1 else 0
    return sorted(shuffled[cut:]), sorted(shuffled[:cut])


def factory(spec: str, builtin: Builtin | None = None) -> TaskFactory:
    """`module:function` (imported), or a built-in model's name (with the
    `builtin` options). Raises TaskError."""
    if ":" not in spec:
        if spec not in training.MODELS:
            raise TaskError(f"unknown task {spec!r}: a built-in ({', '.join(training.MODELS)}) "
                            "or module:function")
        options = builtin or Builtin()
        return dataclasses.replace(options, model=spec)
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskError(f"--task {spec}: cannot import {module_name}: {error}") from None
    found = getattr(module, name, None)
    if not callable(found):
        raise TaskError(f"--task {spec}: {module_name} has no function {name}")
    built: TaskFactory = found
    return built


def evaluator(task: Task) -> Callable[[Mapping[str, torch.Tensor]], dict[str, float]]:
    """Evaluates a global model's state_dict on `task`'s test data (the
    server's own evaluation of every model)."""
    model = task.model()

    def evaluate(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(state)
        return dict(task.evaluate(model).metrics)

    return evaluate
