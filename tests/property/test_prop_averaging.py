"""Properties of the weighted average (paramserver.averaging) and of its streamed
twin over spooled files (paramserver.spool.aggregate)."""

from __future__ import annotations

import math
import random
import sys
import tempfile
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from property_strategies import (
    ALL_DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    NARROW_FLOAT_DTYPES,
    Entry,
    StateDict,
    client_names,
    entries,
    finite_state_dicts,
    finite_tensors,
    tensor_bytes,
)

from paramserver import codec, spool
from paramserver.averaging import average_state_dicts, weight_fractions
from paramserver.errors import AveragingError, MalformedUpdateError, ParamServerError

# pytest-timeout's default signal method does not end a hang inside a
# hypothesis test: hypothesis catches the timeout as a failure and shrinks it,
# re-running the hanging example with no second alarm. The thread method
# always ends the run (with every thread's stack). The limit stays the global one.
pytestmark = pytest.mark.timeout(method="thread")

Updates = dict[str, tuple[int, StateDict]]

U64 = 2.0**-53  # unit roundoff of float64
# The reference test keeps float64 values away from the top of the range (where
# the float64 accumulator itself can overflow: see test_average_between_min_and_max)
# and int64 values in the range the float64 accumulator holds exactly.
FLOAT_MAX = 2.0**1000
INT_MAX = 2**40

# Numbers of examples: small, or large enough that w / W rounds differently
# from float(w) / float(W).
weights = st.one_of(st.integers(1, 1000), st.integers(1, 2**64))


@st.composite
def updates(draw: st.DrawFn, dtypes: Sequence[torch.dtype] = ALL_DTYPES, *,
            min_clients: int = 1, max_clients: int = 5, float_max: float | None = FLOAT_MAX,
            int_max: int | None = INT_MAX, equal_weights: bool = False,
            weight: st.SearchStrategy[int] = weights) -> tuple[list[Entry], Updates]:
    """Specs, then (weight, state_dict) per client id; every client the same specs."""
    specs = draw(entries(dtypes))
    ids = draw(st.lists(client_names, min_size=min_clients, max_size=max_clients, unique=True))
    common = draw(weight)
    return specs, {
        cid: (common if equal_weights else draw(weight),
              draw(finite_state_dicts(specs, float_max=float_max, int_max=int_max)))
        for cid in ids
    }


# -- the reference -------------------------------------------------------------


def exact_average(values: Sequence[Sequence[float | int | bool]],
                  ws: Sequence[int]) -> list[Fraction]:
    """sum(w_i * x_i) / sum(w_i) per element, exactly."""
    total = sum(ws)
    return [sum((Fraction(w) * Fraction(v) for w, v in zip(ws, column, strict=True)),
                Fraction(0)) / total
            for column in zip(*values, strict=True)]


def accumulation_error(n: int, max_abs: float) -> float:
    """A bound on |float64 fold - exact| for n terms of magnitude <= max_abs:
    the fractions, products and sums each round once (with room to spare), plus
    float64 underflow in the products."""
    return 2 * (n + 2) * U64 * max_abs + 2 * n * 2.0**-1074


def float_tolerance(dtype: torch.dtype, exact: float, err64: float) -> float:
    """|result - exact| allowed for a float result: the float64 error, then one
    rounding to `dtype` (half an ulp, or half the smallest subnormal), doubled."""
    info = torch.finfo(dtype)
    unit = info.eps / 2
    smallest_subnormal = info.tiny * info.eps
    return 2 * (unit * (abs(exact) + err64) + err64 + smallest_subnormal / 2)


def check_against(result: torch.Tensor, exact: Sequence[Fraction], err64: float,
                  dtype: torch.dtype, what: str) -> None:
    got = result.flatten().tolist()
    assert len(got) == len(exact)
    for i, (g, q) in enumerate(zip(got, exact, strict=True)):
        if dtype.is_floating_point:
            assert math.isfinite(g), f"{what}[{i}] = {g}, expected {float(q)}"
            tol = float_tolerance(dtype, float(q), err64)
            assert abs(Fraction(g) - q) <= Fraction(tol), (
                f"{what}[{i}] = {g!r}, expected {float(q)!r} within {tol!r}")
        else:
            assert_rounded(int(g), q, err64, f"{what}[{i}]")


def assert_rounded(got: int, exact: Fraction, err64: float, what: str) -> None:
    """An integer or bool result is the exact mean rounded half to even, except
    that within float64's error of a .5 it may round either way."""
    floor = math.floor(exact)
    if abs(exact - floor - Fraction(1, 2)) <= Fraction(err64 + 1e-9):
        assert got in (floor, floor + 1), f"{what} = {got}, expected {float(exact)} rounded"
    else:
        assert got == round(exact), f"{what} = {got}, expected round({float(exact)})"


def max_abs(update_set: Updates, name: str) -> float:
    return max((float(sd[name].double().abs().max()) if sd[name].numel() else 0.0)
               for _, sd in update_set.values())


def check_result_specs(result: Mapping[str, torch.Tensor], specs: Sequence[Entry]) -> None:
    assert list(result) == [name for name, _, _ in specs]
    for name, dtype, shape in specs:
        assert result[name].dtype == dtype, name
        assert tuple(result[name].shape) == shape, name


# -- against an independent reference --------------------------------------------


@given(updates())
def test_average_matches_exact_reference(case: tuple[list[Entry], Updates]) -> None:
    specs, update_set = case
    result = average_state_dicts(update_set)
    check_result_specs(result, specs)
    order = sorted(update_set)
    ws = [update_set[c][0] for c in order]
    for name, dtype, _ in specs:
        values = [update_set[c][1][name].flatten().tolist() for c in order]
        exact = exact_average(values, ws)
        err64 = accumulation_error(len(order), max_abs(update_set, name))
        check_against(result[name], exact, err64, dtype, name)


@given(updates(equal_weights=True))
def test_equal_weights_give_the_plain_mean(case: tuple[list[Entry], Updates]) -> None:
    specs, update_set = case
    result = average_state_dicts(update_set)
    check_result_specs(result, specs)
    n = len(update_set)
    for name, dtype, _ in specs:
        stacked = torch.stack([sd[name] for _, sd in update_set.values()])
        mean = stacked.double().mean(0).flatten().tolist()
        # The torch mean has its own float64 error: allow both.
        err64 = 2 * accumulation_error(n, max_abs(update_set, name))
        check_against(result[name], [Fraction(m) for m in mean], err64, dtype, name)


@given(st.lists(weights, min_size=1, max_size=8))
def test_weight_fractions_are_correctly_rounded(ws: list[int]) -> None:
    """p_i is w_i / W rounded once (what makes scaling the weights harmless)."""
    total = sum(ws)
    assert weight_fractions(ws) == [float(Fraction(w, total)) for w in ws]


@given(st.sampled_from((*INT_DTYPES, torch.bool)), st.sampled_from([2, 4, 8]), st.data())
def test_exact_ties_round_half_to_even(dtype: torch.dtype, n: int, data: st.DataObject) -> None:
    """With 2, 4 or 8 equally weighted clients and small values the float64 fold
    is exact, so a mean that ends in .5 must go to the even neighbour (for bool:
    a tied vote is False)."""
    values = data.draw(st.lists(finite_tensors(dtype, (6,), int_max=2**20), min_size=n,
                                max_size=n), label="values")
    weight = data.draw(weights, label="weight")
    result = average_state_dicts({f"c{i}": (weight, {"t": v}) for i, v in enumerate(values)})
    exact = [Fraction(sum(int(v) for v in column), n)
             for column in zip(*(v.tolist() for v in values), strict=True)]
    assert [int(v) for v in result["t"].tolist()] == [round(q) for q in exact]


# -- bit-exact invariances ---------------------------------------------------------


def digest(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    return codec.state_dict_digest(state_dict)


@given(updates(float_max=None, int_max=None), st.randoms(use_true_random=False))
def test_insertion_order_does_not_matter(case: tuple[list[Entry], Updates],
                                         rng: random.Random) -> None:
    _, update_set = case
    keys = list(update_set)
    rng.shuffle(keys)
    shuffled = {k: update_set[k] for k in keys}
    assert digest(average_state_dicts(shuffled)) == digest(average_state_dicts(update_set))


@given(updates(float_max=None, int_max=None, min_clients=2), st.data())
def test_order_preserving_relabelling_is_bit_identical(case: tuple[list[Entry], Updates],
                                                       data: st.DataObject) -> None:
    _, update_set = case
    old = sorted(update_set)
    new = sorted(data.draw(st.lists(client_names, min_size=len(old), max_size=len(old),
                                    unique=True), label="new ids"))
    # Give the relabelled mapping a shuffled insertion order as well.
    pairs = data.draw(st.permutations(list(zip(old, new, strict=True))), label="order")
    relabelled = {n: update_set[o] for o, n in pairs}
    assert digest(average_state_dicts(relabelled)) == digest(average_state_dicts(update_set))


@given(updates(float_max=None, int_max=None),
       st.one_of(st.integers(1, 1000), st.integers(1, 2**80)))
def test_scaling_every_weight_is_bit_identical(case: tuple[list[Entry], Updates],
                                               k: int) -> None:
    _, update_set = case
    scaled = {c: (w * k, sd) for c, (w, sd) in update_set.items()}
    assert digest(average_state_dicts(scaled)) == digest(average_state_dicts(update_set))


# Largest int64 magnitude whose identical copies still average exactly: the
# fold's relative float64 error is at most (n + 1) * 2**-53 for n <= 8 clients.
IDENTICAL_INT_MAX = 2**48


@given(entries((*NARROW_FLOAT_DTYPES, *INT_DTYPES, torch.bool)), st.data())
def test_identical_copies_average_to_the_copy(specs: list[Entry], data: st.DataObject) -> None:
    copy = data.draw(finite_state_dicts(specs, int_max=IDENTICAL_INT_MAX), label="copy")
    ids = data.draw(st.lists(client_names, min_size=1, max_size=8, unique=True), label="ids")
    update_set = {c: (data.draw(weights, label=f"w[{c}]"), {k: v.clone() for k, v in copy.items()})
                  for c in ids}
    result = average_state_dicts(update_set)
    check_result_specs(result, specs)
    for name in copy:
        assert tensor_bytes(result[name]) == tensor_bytes(copy[name]), name


def elementwise_bounds(update_set: Updates, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack([sd[name].double() for _, sd in update_set.values()])
    return stacked.min(0).values, stacked.max(0).values


@example(  # all-float64 copies of the largest finite double, fractions 1/5, 2/5, 2/5
    case=([("w", torch.float64, (1,))],
          {c: (w, {"w": torch.tensor([sys.float_info.max], dtype=torch.float64)})
           for c, w in (("a", 1), ("b", 2), ("c", 2))}),
)
@given(updates(FLOAT_DTYPES, float_max=None))
def test_average_between_min_and_max(case: tuple[list[Entry], Updates]) -> None:
    """Every element of the average lies between the smallest and largest value
    of that element over the updates: exactly for float32 and narrower (the cast
    rounds monotonically), within float64's accumulation error for float64. A
    finite average of finite values in particular."""
    specs, update_set = case
    result = average_state_dicts(update_set)
    n = len(update_set)
    for name, dtype, _ in specs:
        lo, hi = elementwise_bounds(update_set, name)
        got = result[name].double()
        assert torch.isfinite(got).all(), f"{name}: non-finite average {got} of finite values"
        if dtype == torch.float64:  # within the float64 fold's error
            slack = accumulation_error(n, max_abs(update_set, name))
            lo, hi = lo - slack, hi + slack
        assert (got >= lo).all(), (name, got, lo)
        assert (got <= hi).all(), (name, got, hi)


@example(
    # Identical copies of int64's extremes: the float64 accumulator rounds them
    # to +-2**63, and the cast back to int64 wraps 2**63 around to -2**63.
    case=([("n", torch.int64, (2,))],
          {c: (1, {"n": torch.tensor([2**63 - 1, -(2**63)], dtype=torch.int64)})
           for c in ("a", "b", "c")}),
)
@given(updates((*INT_DTYPES, torch.bool), int_max=None))
def test_integer_average_between_min_and_max(case: tuple[list[Entry], Updates]) -> None:
    """The same for integer and bool entries: exactly while the values fit well
    in float64's 53 bits; beyond, within the documented precision loss, and never
    wrapping around to the other end of the range."""
    specs, update_set = case
    result = average_state_dicts(update_set)
    n = len(update_set)
    for name, _, _ in specs:
        values = [[int(v) for v in sd[name].flatten().tolist()] for _, sd in update_set.values()]
        got = [int(v) for v in result[name].flatten().tolist()]
        for i, g in enumerate(got):
            column = [row[i] for row in values]
            lo, hi = min(column), max(column)
            big = max(abs(lo), abs(hi))
            slack = 0 if big <= IDENTICAL_INT_MAX else math.ceil(accumulation_error(n, big)) + 1
            assert lo - slack <= g <= hi + slack, f"{name}[{i}] = {g}, inputs {column}"


# -- errors ------------------------------------------------------------------------

MUTATIONS = ("drop_key", "extra_key", "rename_key", "reorder_keys", "shape", "dtype",
             "unsupported_dtype", "non_finite", "zero_weights", "negative_weight",
             "non_integer_weight", "empty")


def _mutate(update_set: Updates, specs: list[Entry], mutation: str, victim: str,
            data: st.DataObject) -> tuple[Updates | dict[str, tuple[object, StateDict]],
                                          type[ParamServerError], str | None]:
    """A broken copy of `update_set`, the error it must raise and the tensor the
    error must name (None: any or none)."""
    out: dict[str, tuple[object, StateDict]] = {c: (w, dict(sd)) for c, (w, sd) in
                                                update_set.items()}
    w, sd = out[victim]
    name = data.draw(st.sampled_from([n for n, _, _ in specs]), label="tensor")
    dtype = sd[name].dtype
    if mutation == "drop_key":
        del sd[name]
        return out, MalformedUpdateError, None
    if mutation == "extra_key":
        sd[name + "~extra"] = torch.zeros(1)
        return out, MalformedUpdateError, None
    if mutation == "rename_key":
        sd[name + "~renamed"] = sd.pop(name)
        return out, MalformedUpdateError, None
    if mutation == "reorder_keys":
        assume(len(sd) >= 2)
        out[victim] = (w, dict(reversed(list(sd.items()))))
        return out, MalformedUpdateError, None
    if mutation == "shape":
        sd[name] = sd[name].unsqueeze(0)
        return out, MalformedUpdateError, name
    if mutation in ("dtype", "unsupported_dtype"):
        choices = ([torch.complex64] if mutation == "unsupported_dtype"
                   else [d for d in ALL_DTYPES if d != dtype])
        sd[name] = sd[name].to(data.draw(st.sampled_from(choices), label="new dtype"))
        return out, MalformedUpdateError, name
    if mutation == "non_finite":
        floats = [n for n, d, s in specs if d.is_floating_point and math.prod(s) > 0]
        assume(floats)
        name = data.draw(st.sampled_from(floats), label="float tensor")
        tensor = sd[name].clone()
        index = data.draw(st.integers(0, tensor.numel() - 1), label="element")
        tensor.view(-1)[index] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        sd[name] = tensor
        return out, MalformedUpdateError, name
    if mutation == "zero_weights":
        return {c: (0, s) for c, (_, s) in out.items()}, AveragingError, None
    if mutation == "negative_weight":
        out[victim] = (-data.draw(weights, label="negative weight"), sd)
        return out, AveragingError, None
    if mutation == "non_integer_weight":
        out[victim] = (data.draw(st.sampled_from([1.5, 2.0, True, "3", None])), sd)
        return out, AveragingError, None
    assert mutation == "empty"
    return {}, AveragingError, None


@pytest.mark.parametrize("mutation", MUTATIONS)
@given(case=updates(min_clients=2), data=st.data())
def test_bad_updates_raise_our_errors(case: tuple[list[Entry], Updates], mutation: str,
                                      data: st.DataObject) -> None:
    specs, update_set = case
    victim = data.draw(st.sampled_from(sorted(update_set)), label="victim")
    broken, expected, tensor = _mutate(update_set, specs, mutation, victim, data)
    with pytest.raises(ParamServerError) as info:
        average_state_dicts(broken)  # type: ignore[arg-type]
    assert isinstance(info.value, expected), repr(info.value)
    if tensor is not None:
        assert isinstance(info.value, MalformedUpdateError)
        assert info.value.tensor == tensor, repr(info.value)


# -- the streamed aggregation over spooled files -----------------------------------


def spool_updates(root: Path, update_set: Updates, chunk: int) -> list[spool.SpooledUpdate]:
    """Writes each update the way the server does (chunks into a SpoolWriter,
    seal, commit) and returns them in canonical order."""
    store = spool.Spool(root)
    out = []
    for client in sorted(update_set):
        weight, state_dict = update_set[client]
        header = codec.UpdateHeader(
            client_id=client, round=1, num_examples=weight, specs=codec.spec_of(state_dict),
            sha256=codec.state_dict_digest(state_dict))
        writer = store.writer(header)
        try:
            for piece in codec.iter_chunks(codec.payload_views(state_dict), chunk):
                writer.write(piece)
            writer.seal()
            out.append(writer.commit())
        finally:
            writer.discard()
        assert out[-1].num_examples == weight
    return out


# Weights a SendUpdate header can carry.
wire_weights = st.integers(1, codec.MAX_NUM_EXAMPLES)


@given(updates(float_max=None, int_max=None, weight=wire_weights), st.integers(1, 64),
       st.integers(-2, 48), st.integers(1, 3))
def test_spooled_aggregate_is_bit_identical_to_in_memory(
        case: tuple[list[Entry], Updates], chunk: int, block_bytes: int, workers: int) -> None:
    """Whatever the block size and however many threads fold blocks at once."""
    _specs, update_set = case
    expected = average_state_dicts(update_set)
    model_spec = codec.spec_of(expected)
    with tempfile.TemporaryDirectory() as tmp:
        spooled = spool_updates(Path(tmp), update_set, chunk)
        payload = spool.aggregate(model_spec, spooled, block_bytes=block_bytes,
                                  workers=workers)
    assert len(payload) == codec.payload_size(model_spec)
    assert codec.payload_digest([payload]) == codec.state_dict_digest(expected)


@given(st.sampled_from(ALL_DTYPES), st.data())
def test_single_tensor_spooled_in_many_blocks(dtype: torch.dtype, data: st.DataObject) -> None:
    """A longer tensor cut into many blocks, the block edge anywhere."""
    n = data.draw(st.integers(1, 200), label="numel")
    ids = data.draw(st.lists(client_names, min_size=1, max_size=4, unique=True), label="ids")
    update_set: Updates = {
        c: (data.draw(wire_weights), {"t": data.draw(finite_tensors(dtype, (n,)))}) for c in ids}
    block_bytes = data.draw(st.integers(1, n * dtype.itemsize + 8), label="block_bytes")
    expected = average_state_dicts(update_set)
    with tempfile.TemporaryDirectory() as tmp:
        spooled = spool_updates(Path(tmp), update_set, codec.MAX_CHUNK_SIZE)
        payload = spool.aggregate(codec.spec_of(expected), spooled, block_bytes=block_bytes)
    assert bytes(payload) == tensor_bytes(expected["t"])

