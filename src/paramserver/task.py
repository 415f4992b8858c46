"""What a client trains: a Task bundles a model factory, training and held-out
data (any torch.utils.data Dataset), the loss and the local optimizer, and
the library runs the training loop, so that every Task gets the strategy's
per-round settings (FedProx's proximal term) without writing them itself.

Everything is seeded: the order of a client's batches depends only on (seed,
client name, round), so a run is reproducible bit for bit.

Imports torch only; no grpc, no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

Batch = tuple[torch.Tensor, torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


def sgd(parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr)


@dataclass(frozen=True)
class Result:
    """What training or evaluation reports: the examples behind it (the
    weight) and metrics such as loss and accuracy."""

    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Task:
    """A client's part of an experiment. `model()` builds the architecture
    (its initial parameters do not matter: every client starts from the
    server's round-0 model); `loss(outputs, targets)` is a mean over a batch."""

    model: Callable[[], nn.Module]
    train_data: Dataset[Any]  # (input, target) pairs
    test_data: Dataset[Any] | None = None
    loss: Loss = nn.functional.cross_entropy
    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 1
    optimizer: OptimizerFactory = sgd
    seed: int = 0

    def train(self, model: nn.Module, round: int, client: str,
              config: Mapping[str, float] | None = None) -> Result:
        """Trains `model` in place on this client's data for `round`; returns
        the number of examples and the mean training loss. With
        config["proximal_mu"] = mu > 0 (FedProx, Li et al. 2020, eq. 2), the
        loss is F_k(w) + mu / 2 * ||w - w_round||^2, w_round the parameters
        `model` had when called."""
        mu = float((config or {}).get("proximal_mu", 0.0))
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
        optimizer = self.optimizer(list(model.parameters()), self.lr)
        generator = _generator("shuffle", self.seed, client, round)
        model.train()
        total, batches = 0.0, 0
        for _ in range(self.epochs):
            for inputs, targets in _batches(self.train_data, self.batch_size, generator):
                optimizer.zero_grad()
                loss = self.loss(model(inputs), targets)
                if mu > 0:
                    loss = loss + mu / 2 * _squared_distance(model, anchor)
                torch.autograd.backward(loss)
                optimizer.step()
                total += float(loss.item())
                batches += 1
        return Result(len(self.train_data), {"loss": total / max(batches, 1)})  # type: ignore[arg-type]

    def evaluate(self, model: nn.Module, data: Dataset[Any] | None = None) -> Result:
        """Mean loss and accuracy of `model` on `data` (default: the test data;
        classification targets). Raises ValueError if there is none."""
        data = data if data is not None else self.test_data
        if data is None:
            raise ValueError("this task has no held-out data to evaluate on")
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for inputs, targets in _batches(data, 1024, None):
                outputs = model(inputs)
                loss_sum += float(self.loss(outputs, targets).item()) * len(targets)
                correct += int((outputs.argmax(dim=1) == targets).sum().item())
                count += len(targets)
        return Result(count, {"loss": loss_sum / max(count, 1),
                              "accuracy": correct / max(count, 1)})


def _squared_distance(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    terms = [(p - a).square().sum() for p, a in zip(model.parameters(), anchor, strict=True)]
    return torch.stack(terms).sum()


def _batches(data: Dataset[Any], batch_size: int,
             generator: torch.Generator | None) -> Iterator[Batch]:
    """Batches in a seeded order (None: in order). Tensors in memory are
    indexed directly; any other Dataset goes through a DataLoader."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        inputs, targets = data.tensors
        n = len(inputs)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            index = (order[start:start + batch_size] if order is not None
                     else slice(start, start + batch_size))
            yield inputs[index], targets[index]
        return
    loader: DataLoader[Batch] = DataLoader(data, batch_size=batch_size,
                                           shuffle=generator is not None, generator=generator)
    yield from loader


def _generator(*parts: object) -> torch.Generator:
    # crc32 instead of hash(): Python salts str hashes per process.
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))
