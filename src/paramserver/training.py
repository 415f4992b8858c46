"""Local training: models, generated data, the training loop, evaluation.

The default task needs no download: inputs are Gaussian 784-vectors and labels
come from a fixed random "teacher" network, so the task is learnable and the
loss visibly falls over rounds. Everything is seeded: a client's data depends
only on (seed, client name), its training on (seed, client name, round), and
the teacher and test set on the seed alone, so a run is reproducible bit for bit.

Imports torch and task; no grpc, no I/O.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from paramserver.task import Task

INPUTS, HIDDEN, CLASSES = 784, 128, 10


def mlp(features: int = INPUTS, classes: int = CLASSES) -> nn.Module:
    """The default model: MLP features-128-classes with ReLU (784-128-10)."""
    return nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, classes))


def cnn(features: int = INPUTS, classes: int = CLASSES) -> nn.Module:
    """A small CNN with BatchNorm (float buffers and an int64 counter) on
    square images given flattened (784 inputs: 1x28x28; 64: the 8x8 digits)."""
    side = math.isqrt(features)
    if side * side != features or side < 5:
        raise ValueError(f"the cnn needs square images of at least 5x5, not {features} inputs")
    inner = ((side - 3) // 2 + 1 - 3) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * inner * inner, classes),
    )


def big(features: int = 5000, classes: int = 5000) -> nn.Module:
    """One Linear 5000x5000 without bias: 100 MB of float32, for the benchmarks
    of large models (it trains on 5000-wide inputs, not on the 784 default)."""
    return nn.Linear(features, classes, bias=False)


@dataclass(frozen=True)
class ModelKind:
    """A built-in model and the shape of the data it trains on."""

    build: Callable[[int, int], nn.Module]  # (features, classes)
    features: int  # of the generated data it trains on
    classes: int


MODELS: dict[str, ModelKind] = {
    "mlp": ModelKind(mlp, INPUTS, CLASSES),
    "cnn": ModelKind(cnn, INPUTS, CLASSES),
    "big": ModelKind(big, 5000, 5000),
}


@dataclass(frozen=True)
class TrainConfig:
    model: str = "mlp"
    seed: int = 0
    examples: int = 2000
    learning_rate: float = 0.1
    batch_size: int = 32
    local_epochs: int = 1


def build_model(name: str, seed: int, features: int | None = None,
                classes: int | None = None) -> nn.Module:
    """The initial global model: the same parameters for the same seed. The
    shape of its data: the generated data's unless given."""
    kind = _kind(name)
    torch.manual_seed(seed)
    return kind.build(features or kind.features, classes or kind.classes)


def _kind(name: str) -> ModelKind:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def _generator(*parts: object) -> torch.Generator:
    # crc32 instead of hash(): Python salts str hashes per process.
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _teacher(seed: int, kind: ModelKind) -> nn.Module:
    default = (kind.features, kind.classes) == (INPUTS, CLASSES)
    gen = _generator("teacher", seed) if default else _generator("teacher", seed, kind.features)
    # Linear, so that a few rounds on a few thousand examples visibly learn it.
    teacher = nn.Linear(kind.features, kind.classes)
    with torch.no_grad():
        for param in teacher.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return teacher


def make_dataset(seed: int, name: str, examples: int,
                 model: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    """`examples` inputs of the width `model` takes and teacher labels over its
    classes, seeded by (seed, name)."""
    kind = _kind(model)
    parts = ("data", seed, name) if kind.features == INPUTS else ("data", seed, name, model)
    x = torch.randn(examples, kind.features, generator=_generator(*parts))
    with torch.no_grad():
        y = _teacher(seed, kind)(x).argmax(dim=1)
    return x, y


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: TrainConfig,
          round: int, client: str) -> float:
    """Trains `model` in place with SGD; returns the mean training loss."""
    x, y = data
    gen = _generator("shuffle", config.seed, client, round)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, batches = 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), config.batch_size):
            idx = order[start:start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Loss and accuracy of `model` on `data`."""
    x, y = data
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def builtin_task(model: str, seed: int, client: str, examples: int, lr: float = 0.1,
                 batch_size: int = 32, epochs: int = 1) -> Task:
    """A built-in model on this client's generated data (seeded by (seed,
    client)); its held-out data is a fifth as large, generated apart."""
    held_out = max(1, examples // 5)
    return Task(model=lambda: build_model(model, seed),
                train_data=TensorDataset(*make_dataset(seed, client, examples, model)),
                test_data=TensorDataset(*make_dataset(seed, f"{client}#held-out", held_out,
                                                      model)),
                lr=lr, batch_size=batch_size, epochs=epochs, seed=seed)


def make_evaluator(model_name: str, seed: int, examples: int = 2000,
                   ) -> Callable[[Mapping[str, torch.Tensor]], dict[str, float]]:
    """Evaluates a global model's state_dict on the seed's held-out test set."""
    test_set = make_dataset(seed, "<test set>", examples, model_name)  # not a client name
    model = build_model(model_name, seed)

    def evaluator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(state_dict)
        return evaluate(model, test_set)

    return evaluator
