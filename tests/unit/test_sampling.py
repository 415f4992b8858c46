"""Client sampling and federated evaluation: pure functions of their inputs."""

import pytest

from paramserver.errors import EvaluationClosedError
from paramserver.evaluation import Evaluations
from paramserver.sampling import Sampling, select

NAMES = frozenset(f"c{i}" for i in range(10))


def test_a_sample_depends_only_on_seed_round_and_names() -> None:
    first = select(7, 3, sorted(NAMES), 4)
    assert select(7, 3, sorted(NAMES, reverse=True), 4) == first  # not on the order
    assert len(first) == 4
    assert first <= NAMES
    assert any(select(seed, 3, NAMES, 4) != first for seed in range(8, 28))  # seeds matter
    assert any(select(7, r, NAMES, 4) != first for r in range(4, 24))  # rounds matter
    assert select(7, 3, NAMES, 40) == NAMES
    # Training and evaluation cohorts are drawn apart: over 20 rounds they differ.
    assert any(select(7, r, NAMES, 4) != select(7, r, NAMES, 4, "evaluate") for r in range(20))


def test_sample_counts() -> None:
    assert Sampling(fraction=0.25, minimum=1).count(10) == 3  # ceil(2.5)
    assert Sampling(fraction=0.01, minimum=2).count(10) == 2
    assert Sampling(size=4).count(3) == 3
    assert Sampling().count(5) == 5
    with pytest.raises(ValueError, match="not both"):
        Sampling(fraction=0.5, size=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Sampling(fraction=1.5)


def test_federated_evaluation_weighs_reports_by_examples() -> None:
    evaluations = Evaluations(every=2, sampling=Sampling())
    assert evaluations.published(1, frozenset({"a", "b"})) is None  # not an evaluated round
    assert not evaluations.wants("a", 1)
    assert evaluations.published(2, frozenset({"a", "b"})) is None
    assert evaluations.wants("a", 2)
    assert evaluations.wants("b", 2)
    assert evaluations.report("a", 2, 10, {"loss": 1.0, "accuracy": 0.5}) == (True, None)
    assert evaluations.report("a", 2, 10, {"loss": 9.0}) == (False, None)  # counted once
    counted, result = evaluations.report("b", 2, 30, {"loss": 3.0, "accuracy": 1.0})
    assert counted
    assert result is not None
    assert (result.round, result.clients, result.num_examples) == (2, 2, 40)
    assert result.metrics == {"accuracy": 0.875, "loss": 2.5}
    with pytest.raises(EvaluationClosedError):
        evaluations.report("a", 2, 1, {})


def test_an_evaluation_closes_with_whoever_reported_when_the_next_opens() -> None:
    evaluations = Evaluations(every=1, sampling=Sampling())
    evaluations.published(1, frozenset({"a", "b"}))
    evaluations.report("a", 1, 5, {"loss": 2.0})
    closed = evaluations.published(2, frozenset({"a", "b"}))
    assert closed is not None
    assert (closed.round, closed.clients, closed.cohort) == (1, 1, 2)
    with pytest.raises(EvaluationClosedError):
        evaluations.report("b", 1, 5, {"loss": 2.0})
