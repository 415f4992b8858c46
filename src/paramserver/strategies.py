"""How a round's updates become the next global model: pure (torch only, no
I/O, no threads), block by block, each strategy a formula from its paper.

A Strategy makes, for every round, an Aggregation that the driver
(aggregation.py) feeds block by block: `rows` holds one block of every update
of the round, one row per update in canonical order (sorted client ids), as a
(K, n) tensor of the tensor's dtype that the strategy owns. Strategies that
need more than one look at the updates (Krum's distances) have `passes` 2 and
`observe` every block before they `combine` any. `combine` returns float64
for float tensors (the driver rounds once to the dtype, after the server
optimizer if there is one) and the final values for integer and bool tensors.
The driver never holds more than one block of every update at a time, so
memory is O(model + clients x block) whatever the strategy.

Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) act on the float
tensors only; integer and bool tensors take the aggregate as it is.

Imports torch, errors, specs, averaging; must not import grpc or protobuf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from paramserver.averaging import (
    Weights,
    fold_integers,
    fold_to_float64,
)
from paramserver.errors import AveragingError
from paramserver.specs import TensorSpec


@dataclass(frozen=True)
class Block:
    """Elements [start, start + count) of one tensor."""

    tensor: TensorSpec
    start: int
    count: int


class Aggregation(Protocol):
    """One round's aggregation. See the module docstring. Blocks start on
    multiples of `granule` elements of their tensor."""

    passes: int
    granule: int

    def observe(self, block: Block, rows: torch.Tensor) -> None:
        """Sees every block, in order, in each pass before the last."""

    def ready(self) -> None:
        """Called once after the observing passes, before any combine."""

    def combine(self, block: Block, rows: torch.Tensor, weights: Weights) -> torch.Tensor:
        """The aggregate of one block: float64 for float tensors, else final."""


class ServerOptimizer(Protocol):
    """x_{t+1} from x_t and the aggregate, with state that persists across rounds."""

    state_names: tuple[str, ...]

    def initial_state(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The state `name` before the first round (float64, like `current`)."""

    def step(self, current: torch.Tensor, aggregate: torch.Tensor,
             state: MutableMapping[str, torch.Tensor]) -> torch.Tensor:
        """The new parameters (float64); updates `state` (float64) in place."""


class Strategy(Protocol):
    name: str
    min_updates: int  # fewest updates it can combine (a round needs its quorum to be this)
    optimizer: ServerOptimizer | None

    def aggregation(self, updates: int) -> Aggregation: ...

    def round_config(self, round: int) -> Mapping[str, float]:
        """Sent to the round's clients (FedProx's mu)."""


# -- averaging ------------------------------------------------------------------------


class _Mean:
    """The weighted mean of every update (FedAvg, McMahan et al. 2017, eq. of
    Algorithm 1: sum_k n_k / n * w_k), with averaging.py's guarantee."""

    passes, granule = 1, 1

    def observe(self, block: Block, rows: torch.Tensor) -> None:
        raise AssertionError("one pass")

    def ready(self) -> None:
        raise AssertionError("one pass")

    def combine(self, block: Block, rows: torch.Tensor, weights: Weights) -> torch.Tensor:
        return _weighted(rows, weights)


def _weighted(rows: torch.Tensor, weights: Weights) -> torch.Tensor:
    if rows.dtype.is_floating_point:
        return fold_to_float64(weights.fractions, lambda: iter(rows))
    return fold_integers(weights, lambda: iter(rows))


def _plain(rows: torch.Tensor) -> torch.Tensor:
    """The unweighted mean of the rows, with the same guarantee."""
    return _weighted(rows, Weights.of([1] * rows.shape[0]))


@dataclass
class FedAvg:
    """Federated averaging: the mean of the updates weighted by num_examples
    (McMahan et al. 2017, Algorithm 1). Bit-identical whatever the arrival
    order and the block size."""

    name: str = "fedavg"
    min_updates: int = 1
    optimizer: ServerOptimizer | None = None

    def aggregation(self, updates: int) -> Aggregation:
        return _Mean()

    def round_config(self, round: int) -> Mapping[str, float]:
        return {}


@dataclass
class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks", Algorithm 2): the server averages like FedAvg and sends mu;
    each client minimises h_k(w; w^t) = F_k(w) + mu/2 * ||w - w^t||^2, w^t
    the global model it started the round from (client.py adds the term)."""

    name: str = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        _check(self.mu >= 0, "mu must be >= 0")

    def round_config(self, round: int) -> Mapping[str, float]:
        return {"proximal_mu": self.mu}


# -- server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization") ----------


@dataclass
class Momentum:
    """Server momentum (FedAvgM; Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution", Algorithm 1 with server learning rate):
    v_t = beta * v_{t-1} + Delta_t,  x_{t+1} = x_t + lr * v_t,
    Delta_t = aggregate - x_t (the pseudo-gradient), v_{-1} = 0."""

    lr: float
    beta: float
    state_names: tuple[str, ...] = ("momentum",)

    def initial_state(self, name: str, current: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(current, dtype=torch.float64)

    def step(self, current: torch.Tensor, aggregate: torch.Tensor,
             state: MutableMapping[str, torch.Tensor]) -> torch.Tensor:
        delta = aggregate - current
        v = state["momentum"].mul_(self.beta).add_(delta)
        return current + self.lr * v


@dataclass
class Adaptive:
    """FedAdagrad, FedAdam and FedYogi: Reddi et al. 2021, Algorithm 2, as
    printed (no bias correction of m or v):
      Delta_t = aggregate - x_t
      m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
      v_t = v_{t-1} + Delta_t^2                                    (Adagrad)
      v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)  (Yogi)
      v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2              (Adam)
      x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)
    with m_{-1} = 0 and v_{-1} = tau^2. Every step is computed in float64."""

    kind: str  # "adagrad" | "adam" | "yogi"
    lr: float
    beta1: float
    beta2: float
    tau: float
    state_names: tuple[str, ...] = ("m", "v")

    def initial_state(self, name: str, current: torch.Tensor) -> torch.Tensor:
        if name == "m":
            return torch.zeros_like(current, dtype=torch.float64)
        return torch.full_like(current, self.tau ** 2, dtype=torch.float64)

    def step(self, current: torch.Tensor, aggregate: torch.Tensor,
             state: MutableMapping[str, torch.Tensor]) -> torch.Tensor:
        delta = aggregate - current
        m = state["m"].mul_(self.beta1).add_(delta * (1 - self.beta1))
        v = state["v"]
        squared = delta * delta
        if self.kind == "adagrad":
            v.add_(squared)
        elif self.kind == "yogi":
            v.sub_(squared * (1 - self.beta2) * torch.sign(v - squared))
        else:
            v.mul_(self.beta2).add_(squared * (1 - self.beta2))
        return current + self.lr * m / (torch.sqrt(v) + self.tau)


def fed_avgm(lr: float = 1.0, beta: float = 0.9) -> FedAvg:
    _check(lr > 0 and 0 <= beta < 1, "FedAvgM needs server_lr > 0 and 0 <= momentum < 1")
    return FedAvg(name="fedavgm", optimizer=Momentum(lr, beta))


def fed_opt(kind: str, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
            tau: float = 1e-3) -> FedAvg:
    _check(lr > 0 and tau > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1,
           f"Fed{kind.capitalize()} needs server_lr > 0, tau > 0, 0 <= beta1, beta2 < 1")
    return FedAvg(name=f"fed{kind}", optimizer=Adaptive(kind, lr, beta1, beta2, tau))


# -- robust aggregators -------------------------------------------------------------------


class _Trimmed:
    """The unweighted mean of the middle rows of each coordinate, sorted."""

    passes, granule = 1, 1

    def __init__(self, trim: int) -> None:
        self._trim = trim

    def observe(self, block: Block, rows: torch.Tensor) -> None:
        raise AssertionError("one pass")

    def ready(self) -> None:
        raise AssertionError("one pass")

    def combine(self, block: Block, rows: torch.Tensor, weights: Weights) -> torch.Tensor:
        sortable = rows.to(torch.uint8) if rows.dtype == torch.bool else rows
        # Sorting each coordinate's K values along the last, contiguous axis
        # is several times faster than along the first.
        ordered = torch.sort(sortable.T.contiguous(), dim=1).values
        return _plain(ordered[:, self._trim:rows.shape[0] - self._trim].T)


@dataclass
class Median:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed
    Learning", Definition 1): per coordinate, the middle value of the K
    updates; for an even K the mean of the two middle values. Unweighted."""

    name: str = "median"
    min_updates: int = 1
    optimizer: ServerOptimizer | None = None

    def aggregation(self, updates: int) -> Aggregation:
        return _Trimmed((updates - 1) // 2)

    def round_config(self, round: int) -> Mapping[str, float]:
        return {}


@dataclass
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018, Definition 2): per
    coordinate, drop the floor(beta * K) largest and smallest values and
    average the rest, unweighted. 0 <= beta < 1/2."""

    name: str = "trimmed_mean"
    beta: float = 0.1
    min_updates: int = 1
    optimizer: ServerOptimizer | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.beta < 0.5, "trimmed_mean needs 0 <= beta < 0.5")

    def aggregation(self, updates: int) -> Aggregation:
        return _Trimmed(math.floor(self.beta * updates))

    def round_config(self, round: int) -> Mapping[str, float]:
        return {}


# Krum's squared distances are summed over granules of this many elements,
# then granule by granule in element order: blocks start on granule
# boundaries, so the sums (and the selection) do not depend on the block size.
KRUM_GRANULE = 64


class _Krum:
    """Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent": score(i) = sum of the squared distances from
    update i to its K - f - 2 nearest neighbours; Krum selects the update with
    the lowest score, Multi-Krum the m lowest (ties: the earlier client id),
    and the result is their plain mean. Needs K >= 2f + 3."""

    passes, granule = 2, KRUM_GRANULE

    def __init__(self, updates: int, f: int, m: int) -> None:
        if updates < 2 * f + 3:
            raise AveragingError(f"Krum with f={f} needs at least {2 * f + 3} updates, "
                                 f"got {updates}")
        self._f, self._m = f, min(m, updates)
        self._distances = torch.zeros(updates, updates, dtype=torch.float64)
        self._selected: torch.Tensor | None = None

    def observe(self, block: Block, rows: torch.Tensor) -> None:
        wide = rows.to(torch.float64)
        for i in range(wide.shape[0] - 1):
            squared = (wide[i + 1:] - wide[i]).square_()
            partials = _granule_sums(squared, block.count)
            carried = torch.cat([self._distances[i, i + 1:, None], partials], dim=1)
            # cumsum adds in element order, one after the other: its last
            # column is the running sum, whatever the blocks were.
            self._distances[i, i + 1:] = torch.cumsum(carried, dim=1)[:, -1]

    def ready(self) -> None:
        self._selected = self.selection()

    def combine(self, block: Block, rows: torch.Tensor, weights: Weights) -> torch.Tensor:
        assert self._selected is not None, "ready() comes first"
        return _plain(rows[self._selected])

    def selection(self) -> torch.Tensor:
        """The indices (in canonical order) of the updates Krum selects."""
        distances = self._distances + self._distances.T
        k = distances.shape[0]
        neighbours = k - self._f - 2
        scores = []
        for i in range(k):
            others = torch.cat([distances[i, :i], distances[i, i + 1:]])
            scores.append(float(torch.sort(others).values[:neighbours].sum()))
        order = sorted(range(k), key=lambda i: (scores[i], i))
        return torch.tensor(sorted(order[:self._m]), dtype=torch.long)


def _granule_sums(squared: torch.Tensor, count: int) -> torch.Tensor:
    full = count // KRUM_GRANULE * KRUM_GRANULE
    parts = [squared[:, :full].reshape(squared.shape[0], -1, KRUM_GRANULE).sum(dim=2)]
    if full < count:
        parts.append(squared[:, full:].sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


@dataclass
class Krum:
    """Krum (m = 1) and Multi-Krum (m > 1), Blanchard et al. 2017; f is the
    number of Byzantine updates assumed. See _Krum."""

    name: str = "krum"
    f: int = 1
    m: int = 1
    optimizer: ServerOptimizer | None = None
    min_updates: int = field(init=False)

    def __post_init__(self) -> None:
        _check(self.f >= 0 and self.m >= 1, "krum needs f >= 0 and m >= 1")
        self.min_updates = 2 * self.f + 3

    def aggregation(self, updates: int) -> Aggregation:
        return _Krum(updates, self.f, self.m)

    def round_config(self, round: int) -> Mapping[str, float]:
        return {}


# -- the catalogue ---------------------------------------------------------------------------


class StrategyConfigError(ValueError):
    """A strategy name or parameter that does not exist or is out of range."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise StrategyConfigError(message)


@dataclass(frozen=True)
class Parameter:
    name: str
    default: float
    help: str


@dataclass(frozen=True)
class Entry:
    name: str
    paper: str
    parameters: tuple[Parameter, ...]
    build: object  # Callable[..., Strategy]; kept loose for the table below


SERVER_LR = Parameter("server_lr", 0.01, "server learning rate (eta)")
BETA1 = Parameter("beta1", 0.9, "first-moment decay")
BETA2 = Parameter("beta2", 0.99, "second-moment decay")
TAU = Parameter("tau", 1e-3, "adaptivity (tau)")
OPT_PAPER = "Reddi et al. 2021, Adaptive Federated Optimization, Algorithm 2"

CATALOGUE: dict[str, Entry] = {e.name: e for e in (
    Entry("fedavg", "McMahan et al. 2017, Communication-Efficient Learning..., Algorithm 1",
          (), lambda: FedAvg()),
    Entry("fedprox", "Li et al. 2020, Federated Optimization in Heterogeneous Networks",
          (Parameter("mu", 0.01, "proximal term weight, sent to clients"),),
          lambda mu: FedProx(mu=mu)),
    Entry("fedavgm", "Hsu et al. 2019, Measuring the Effects of Non-Identical Data "
          "Distribution...", (Parameter("server_lr", 1.0, "server learning rate"),
                              Parameter("momentum", 0.9, "server momentum (beta)")),
          lambda server_lr, momentum: fed_avgm(server_lr, momentum)),
    Entry("fedadagrad", OPT_PAPER, (SERVER_LR, TAU),
          lambda server_lr, tau: fed_opt("adagrad", server_lr, tau=tau)),
    Entry("fedadam", OPT_PAPER, (SERVER_LR, BETA1, BETA2, TAU),
          lambda server_lr, beta1, beta2, tau: fed_opt("adam", server_lr, beta1, beta2, tau)),
    Entry("fedyogi", OPT_PAPER, (SERVER_LR, BETA1, BETA2, TAU),
          lambda server_lr, beta1, beta2, tau: fed_opt("yogi", server_lr, beta1, beta2, tau)),
    Entry("median", "Yin et al. 2018, Byzantine-Robust Distributed Learning, Definition 1",
          (), lambda: Median()),
    Entry("trimmed_mean", "Yin et al. 2018, Byzantine-Robust Distributed Learning, "
          "Definition 2", (Parameter("trim", 0.1, "fraction trimmed from each end (beta)"),),
          lambda trim: TrimmedMean(beta=trim)),
    Entry("krum", "Blanchard et al. 2017, Machine Learning with Adversaries, Krum and "
          "Multi-Krum", (Parameter("byzantine", 1, "Byzantine updates assumed (f)"),
                         Parameter("selected", 1, "updates selected and averaged (m; 1 = Krum)")),
          lambda byzantine, selected: Krum(f=int(byzantine), m=int(selected))),
)}


def build(name: str, parameters: Mapping[str, float] | None = None) -> Strategy:
    """The strategy `name` with `parameters` (the others at their defaults).
    Raises StrategyConfigError naming what is wrong."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise StrategyConfigError(f"unknown strategy {name!r}; choose from "
                                  f"{', '.join(CATALOGUE)}")
    given = dict(parameters or {})
    known = {p.name for p in entry.parameters}
    unknown = sorted(set(given) - known)
    if unknown:
        raise StrategyConfigError(f"{name} has no parameter {', '.join(unknown)}; it takes "
                                  f"{', '.join(sorted(known)) or 'none'}")
    for p in entry.parameters:
        if p.name in ("byzantine", "selected") and float(given.get(p.name, p.default)) % 1:
            raise StrategyConfigError(f"{name}: {p.name} must be a whole number")
    values = {p.name: float(given.get(p.name, p.default)) for p in entry.parameters}
    strategy: Strategy = entry.build(**values)  # type: ignore[operator]
    return strategy


def describe() -> Sequence[str]:
    """One paragraph per strategy: name, paper, parameters with defaults."""
    lines = []
    for entry in CATALOGUE.values():
        params = ", ".join(f"{p.name}={p.default:g} ({p.help})" for p in entry.parameters)
        lines.append(f"{entry.name}: {entry.paper}\n    parameters: {params or 'none'}")
    return lines
