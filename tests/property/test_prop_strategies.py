"""Every strategy against a straightforward reference written here from its
paper (whole tensors, exact rationals or float64), with ties, even counts,
N = 1, trims that leave one value and f at its limit; and every strategy
bit-identical whatever the arrival order, the block size and the number of
threads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from exact_reference import check_mean
from hypothesis import assume, given
from hypothesis import strategies as st
from property_strategies import ALL_DTYPES, FLOAT_DTYPES, client_names, finite_tensors

from paramserver import codec, strategies
from paramserver.aggregation import aggregate_in_memory
from paramserver.errors import AveragingError

pytestmark = pytest.mark.timeout(method="thread")

Updates = dict[str, tuple[int, dict[str, torch.Tensor]]]


@st.composite
def rounds(draw: st.DrawFn, dtypes: Sequence[torch.dtype] = ALL_DTYPES, min_clients: int = 1,
           max_clients: int = 7, ties: bool = True, float_max: float | None = None,
           ) -> tuple[Updates, dict[str, torch.Tensor]]:
    """Updates of one round and the global model they started from: one tensor
    (shape drawn), a few clients; values drawn from a small set when `ties`,
    so that equal values and even counts come up on purpose."""
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    shape = draw(st.sampled_from([(), (1,), (7,), (3, 5), (0,), (130,)]), label="shape")
    ids = draw(st.lists(client_names, min_size=min_clients, max_size=max_clients, unique=True),
               label="clients")
    if ties and draw(st.booleans(), label="ties"):
        palette = [draw(finite_tensors(dtype, shape, float_max=float_max)) for _ in range(2)]
        tensors = [palette[draw(st.integers(0, 1))].clone() for _ in ids]
    else:
        tensors = [draw(finite_tensors(dtype, shape, float_max=float_max)) for _ in ids]
    updates: Updates = {c: (draw(st.integers(1, 50)), {"t": t})
                        for c, t in zip(ids, tensors, strict=True)}
    return updates, {"t": draw(finite_tensors(dtype, shape), label="current")}


def columns(updates: Updates) -> list[list[float | int | bool]]:
    """Per element, the values of every update (sorted client order)."""
    rows = [updates[c][1]["t"].flatten().tolist() for c in sorted(updates)]
    return [list(col) for col in zip(*rows, strict=True)] if rows and rows[0] else []


def run(strategy: strategies.Strategy, updates: Updates, current: dict[str, torch.Tensor],
        block_bytes: int | None = None, workers: int = 1) -> torch.Tensor:
    model, _ = aggregate_in_memory(strategy, updates, current, block_bytes=block_bytes,
                                   workers=workers)
    return model["t"]


def check_plain_means(result: torch.Tensor, picked: list[list[float | int | bool]]) -> None:
    """Element i of `result` is the plain mean of picked[i], with averaging's
    guarantee (equal weights)."""
    if not picked:
        assert result.numel() == 0
        return
    count = len(picked[0])
    assert all(len(p) == count for p in picked)
    rows = [[p[j] for p in picked] for j in range(count)]
    check_mean(result, rows, [1] * count, "t")


def order_key(value: float | int | bool) -> Fraction:
    return Fraction(value)


# -- the references ------------------------------------------------------------------------


@given(rounds())
def test_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones(
        case: tuple[Updates, dict[str, torch.Tensor]]) -> None:
    updates, current = case
    result = run(strategies.Median(), updates, current)
    picked = []
    for column in columns(updates):
        ordered = sorted(column, key=order_key)
        k = len(ordered)
        picked.append(ordered[(k - 1) // 2:k // 2 + 1])  # one value, or the middle two
    check_plain_means(result, picked)


@given(rounds(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45, 0.49]))
def test_trimmed_mean_drops_floor_beta_k_from_each_end(
        case: tuple[Updates, dict[str, torch.Tensor]], beta: float) -> None:
    updates, current = case
    result = run(strategies.TrimmedMean(beta=beta), updates, current)
    k = len(updates)
    trim = math.floor(beta * k)
    assert k - 2 * trim >= 1  # beta < 1/2 always leaves a value
    picked = [sorted(column, key=order_key)[trim:k - trim] for column in columns(updates)]
    check_plain_means(result, picked)


def krum_reference(vectors: list[list[float]], f: int, m: int) -> list[int] | None:
    """Blanchard et al. 2017, from the definition, in float64 over whole
    vectors: the m lowest scores (ties: the earlier index). None when two
    scores are so close that summation order could swap them."""
    k = len(vectors)
    dist = [[sum((a - b) ** 2 for a, b in zip(vectors[i], vectors[j], strict=True))
             for j in range(k)] for i in range(k)]
    scores = [sum(sorted(dist[i][j] for j in range(k) if j != i)[:k - f - 2]) for i in range(k)]
    order = sorted(range(k), key=lambda i: (scores[i], i))
    if m < k:
        gap = abs(scores[order[m]] - scores[order[m - 1]])
        if gap <= 1e-9 * max(1.0, abs(scores[order[m]])):
            return None
    return sorted(order[:m])


# Squared distances are float64: beyond about 1e154 they overflow (to inf,
# which compares equal); the reference would too. Values stay below that.
@given(rounds(FLOAT_DTYPES, min_clients=3, max_clients=8, float_max=1e100), st.data())
def test_krum_and_multi_krum_select_by_the_papers_score(
        case: tuple[Updates, dict[str, torch.Tensor]], data: st.DataObject) -> None:
    updates, current = case
    k = len(updates)
    f = data.draw(st.integers(0, (k - 3) // 2), label="f")  # K >= 2f + 3, f at its limit too
    m = data.draw(st.integers(1, k), label="m")
    order = sorted(updates)
    vectors = [[float(v) for v in updates[c][1]["t"].flatten().tolist()] for c in order]
    selected = krum_reference(vectors, f, m)
    assume(selected is not None)
    assert selected is not None
    result = run(strategies.Krum(f=f, m=m), updates, current)
    picked = [[column[i] for i in selected] for column in columns(updates)]
    check_plain_means(result, picked)


def test_krum_refuses_too_few_updates() -> None:
    updates = {f"c{i}": (1, {"t": torch.zeros(2)}) for i in range(4)}
    with pytest.raises(AveragingError, match="at least 5 updates"):
        aggregate_in_memory(strategies.Krum(f=1), updates, {"t": torch.zeros(2)})


@dataclass
class Moments:
    m: list[float]
    v: list[float]


def optimizer_step(kind: str, x: list[float], moments: Moments,
                   updates: list[tuple[int, list[float]]], lr: float, beta1: float,
                   beta2: float, tau: float) -> list[float]:
    """One round of Reddi et al. 2021, Algorithm 2 (Hsu et al. 2019 for
    momentum), in float64 over whole vectors, Delta = weighted mean - x.
    Updates `moments` in place; returns x_{t+1}."""
    total = sum(w for w, _ in updates)
    out = []
    for i, xi in enumerate(x):
        d = sum(Fraction(w) * Fraction(u[i]) for w, u in updates) / total - Fraction(xi)
        delta = float(d)
        m, v = moments.m, moments.v
        if kind == "momentum":
            v[i] = beta1 * v[i] + delta
            out.append(xi + lr * v[i])
            continue
        m[i] = beta1 * m[i] + (1 - beta1) * delta
        sq = delta * delta
        if kind == "adagrad":
            v[i] = v[i] + sq
        elif kind == "yogi":
            v[i] = v[i] - (1 - beta2) * sq * (0.0 if v[i] == sq else math.copysign(1.0, v[i] - sq))
        else:
            v[i] = beta2 * v[i] + (1 - beta2) * sq
        out.append(xi + lr * m[i] / (math.sqrt(v[i]) + tau))
    return out


OPTIMIZERS = ["momentum", "adagrad", "adam", "yogi"]


@pytest.mark.parametrize("kind", OPTIMIZERS)
@given(data=st.data())
def test_server_optimizers_follow_the_papers_update(kind: str, data: st.DataObject) -> None:
    """Three rounds, the state carried: each new global model is the paper's
    x_{t+1} (from the same x_t, kept in float32 between rounds) rounded to
    float32, up to float64 noise."""
    n = data.draw(st.integers(1, 6), label="n")
    values = st.floats(-4, 4, allow_nan=False, width=32)
    lr = data.draw(st.sampled_from([0.01, 0.1, 1.0]), label="lr")
    beta1 = data.draw(st.sampled_from([0.0, 0.5, 0.9]), label="beta1")
    beta2 = data.draw(st.sampled_from([0.0, 0.9, 0.99]), label="beta2")
    tau = data.draw(st.sampled_from([1e-3, 1e-1]), label="tau")
    strategy = (strategies.fed_avgm(lr, beta1) if kind == "momentum"
                else strategies.fed_opt(kind, lr, beta1, beta2, tau))
    current = {"t": torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n),
                                           label="x0"), dtype=torch.float32)}
    start_v = 0.0 if kind == "momentum" else tau * tau
    moments = Moments([0.0] * n, [start_v] * n)
    state = None
    for r in range(3):
        updates = [(data.draw(st.integers(1, 20), label="weight"),
                    data.draw(st.lists(values, min_size=n, max_size=n), label="update"))
                   for _ in range(data.draw(st.integers(1, 4), label=f"clients in round {r}"))]
        want = optimizer_step(kind, [float(v) for v in current["t"]], moments, updates, lr,
                              beta1, beta2, tau)
        given_updates = {f"c{i}": (w, {"t": torch.tensor(u, dtype=torch.float32)})
                         for i, (w, u) in enumerate(updates)}
        current, state = aggregate_in_memory(strategy, given_updates, current, state)
        got = [float(v) for v in current["t"]]
        for g, w in zip(got, want, strict=True):
            assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-6), (r, got, want)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_optimizers_leave_integer_buffers_to_the_average(kind: str) -> None:
    strategy = (strategies.fed_avgm() if kind == "momentum" else strategies.fed_opt(kind))
    current = {"w": torch.zeros(3), "n": torch.tensor(7)}
    updates = {"a": (1, {"w": torch.ones(3), "n": torch.tensor(10)}),
               "b": (3, {"w": torch.ones(3), "n": torch.tensor(2)})}
    model, _ = aggregate_in_memory(strategy, updates, current)
    assert int(model["n"]) == 4  # (10 + 3 * 2) / 4, not an optimizer step


# -- the same bits whatever the order, the blocks and the threads -----------------------------


ALL = [strategies.FedAvg(), strategies.Median(), strategies.TrimmedMean(beta=0.2),
       strategies.Krum(f=1, m=2), strategies.fed_avgm(), strategies.fed_opt("adam"),
       strategies.fed_opt("yogi"), strategies.fed_opt("adagrad"), strategies.FedProx()]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
@given(case=rounds(min_clients=5, ties=False), data=st.data())
def test_bit_identical_whatever_the_order_blocks_and_threads(
        strategy: strategies.Strategy, case: tuple[Updates, dict[str, torch.Tensor]],
        data: st.DataObject) -> None:
    updates, current = case
    reference = codec.state_dict_digest(aggregate_in_memory(strategy, updates, current)[0])
    shuffled = dict(data.draw(st.permutations(list(updates.items())), label="arrival order"))
    block_bytes = data.draw(st.integers(1, 600), label="block bytes")
    workers = data.draw(st.integers(1, 3), label="workers")
    model, _ = aggregate_in_memory(strategy, shuffled, current, block_bytes=block_bytes,
                                   workers=workers)
    assert codec.state_dict_digest(model) == reference


def test_the_catalogue_builds_every_strategy_and_refuses_unknown_names() -> None:
    for name in strategies.CATALOGUE:
        assert strategies.build(name).name == name
    with pytest.raises(strategies.StrategyConfigError, match="unknown strategy"):
        strategies.build("fedsgd")
    with pytest.raises(strategies.StrategyConfigError, match="has no parameter"):
        strategies.build("fedadam", {"mu": 0.1})
    with pytest.raises(strategies.StrategyConfigError, match="beta"):
        strategies.build("trimmed_mean", {"trim": 0.5})
    assert "Reddi et al. 2021" in "\n".join(strategies.describe())
