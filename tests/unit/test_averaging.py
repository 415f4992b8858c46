import pytest
import torch

from paramserver.averaging import (
    Weights,
    average_metrics,
    average_state_dicts,
    fold,
    weight_fractions,
)
from paramserver.codec import state_dict_digest
from paramserver.errors import AveragingError, MalformedUpdateError


def test_weighted_average_of_floats() -> None:
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    out = average_state_dicts({"a": (1, a), "b": (3, b)})
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))


def test_equal_weights_give_plain_mean() -> None:
    sds = {f"c{i}": (5, {"w": torch.randn(10)}) for i in range(4)}
    mean = torch.stack([sd["w"] for _, sd in sds.values()]).double().mean(0)
    assert torch.allclose(average_state_dicts(sds)["w"].double(), mean, atol=1e-6)


def test_order_of_mapping_does_not_matter() -> None:
    sds = {f"c{i}": (i + 1, {"w": torch.randn(100)}) for i in range(5)}
    reversed_sds = dict(reversed(list(sds.items())))
    assert state_dict_digest(average_state_dicts(sds)) == state_dict_digest(
        average_state_dicts(reversed_sds))


def test_non_float_policy_rounds_half_to_even() -> None:
    a = {"n": torch.tensor(1), "m": torch.tensor([True, True])}
    b = {"n": torch.tensor(2), "m": torch.tensor([False, True])}
    out = average_state_dicts({"a": (1, a), "b": (1, b)})
    assert out["n"].item() == 2  # 1.5 rounds half to even
    assert out["n"].dtype == torch.int64
    assert out["m"].tolist() == [False, True]  # a tie goes to False


def test_zero_weights_and_empty_input_raise() -> None:
    with pytest.raises(AveragingError, match="zero"):
        weight_fractions([0, 0])
    with pytest.raises(AveragingError, match="no updates"):
        average_state_dicts({})
    with pytest.raises(AveragingError, match="non-negative"):
        weight_fractions([1, -1])


def test_mismatches_and_nan_are_named() -> None:
    good = {"w": torch.zeros(2)}
    with pytest.raises(MalformedUpdateError, match=r"'w'.*shape"):
        average_state_dicts({"a": (1, good), "b": (1, {"w": torch.zeros(3)})})
    with pytest.raises(MalformedUpdateError, match=r"'w'.*NaN"):
        average_state_dicts({"a": (1, good), "b": (1, {"w": torch.tensor([0.0, float("inf")])})})
    with pytest.raises(MalformedUpdateError, match="missing"):
        average_state_dicts({"a": (1, good), "b": (1, {"v": torch.zeros(2)})})


def test_fold_in_blocks_equals_fold_whole() -> None:
    xs = [torch.randn(1000) for _ in range(3)]
    w = Weights.of([3, 5, 7])
    whole = fold(w, lambda: xs, torch.float32)
    halves = torch.cat([fold(w, lambda: (x[:333] for x in xs), torch.float32),
                        fold(w, lambda: (x[333:] for x in xs), torch.float32)])
    assert torch.equal(whole, halves)


def test_average_metrics_uses_common_keys() -> None:
    out = average_metrics([0.25, 0.75], [{"loss": 1.0, "x": 2.0}, {"loss": 3.0}])
    assert out == {"loss": 2.5}


def test_float64_near_the_top_of_the_range_does_not_overflow() -> None:
    big = torch.tensor([1.7976931348623157e308, -1.7976931348623157e308], dtype=torch.float64)
    out = average_state_dicts({c: (w, {"w": big}) for c, w in (("a", 1), ("b", 2), ("c", 2))})
    assert torch.equal(out["w"], big)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_an_integer_tie_is_rounded_half_to_even_exactly(dtype: torch.dtype) -> None:
    # Weights (2, 3, 1), values (2, 1, 2): the exact mean is 9/6 = 1.5, so 2.
    updates = {c: (w, {"n": torch.tensor(v, dtype=dtype)})
               for c, w, v in (("a", 2, 2), ("b", 3, 1), ("c", 1, 2))}
    assert average_state_dicts(updates)["n"].item() == 2


def test_a_tied_bool_vote_is_false() -> None:
    # 9 + 18 + 1 = 28 examples for True, 11 + 17 = 28 for False.
    votes = [(9, True), (18, True), (1, True), (11, False), (17, False)]
    updates = {f"c{i}": (w, {"b": torch.tensor(v)}) for i, (w, v) in enumerate(votes)}
    assert average_state_dicts(updates)["b"].item() is False


def test_int64_extremes_average_exactly() -> None:
    top, bottom = 2**63 - 1, -(2**63)
    updates = {"a": (3, {"n": torch.tensor([top, bottom])}),
               "b": (5, {"n": torch.tensor([top - 1, bottom + 1])})}
    # (3 * top + 5 * (top - 1)) / 8 = top - 5/8 -> top - 1; likewise bottom + 5/8 -> bottom + 1.
    assert average_state_dicts(updates)["n"].tolist() == [top - 1, bottom + 1]


def test_float16_is_rounded_once() -> None:
    # Just above the midpoint of 1 and the next float16: the answer is the
    # upper neighbour; through float32 it lands on the midpoint and ties down.
    one = torch.tensor(1.0, dtype=torch.float16)
    above = torch.nextafter(one, torch.tensor(2.0, dtype=torch.float16))
    updates = {"a": (2**19 - 1, {"x": one}), "b": (2**19 + 1, {"x": above})}
    assert average_state_dicts(updates)["x"].item() == above.item()
