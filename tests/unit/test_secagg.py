"""Secure aggregation, stage by stage: rounds with and without dropouts,
refusals on tampered or inconsistent input, the never-both guarantee of
reveal, quantisation, the SecAgg+ graph and the primitives."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from paramserver.errors import SecAggError
from paramserver.quantize import Quantization, check_headroom, dequantize, quantize
from paramserver.secagg import (
    ADVERT_SIZE,
    KeyAdvert,
    Reveal,
    SecAggClient,
    advert_from_bytes,
    advert_to_bytes,
    unmask,
)
from paramserver.secagg_crypto import LABEL_MASK, LABEL_SHARE, agree, new_private_key, public_bytes
from paramserver.secagg_masks import (
    Vector,
    expand,
    neighbours,
    pair_sign,
    plain_sum,
    threshold_for,
)
from paramserver.secagg_sim import Fate, simulate_round
from paramserver.shamir import PRIME, Share, share_from_bytes, share_to_bytes
from paramserver.specs import spec_of

Q = Quantization()
CONTEXT = b"round 7"
NAMES = [f"c{i}" for i in range(5)]


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def updates(names: list[str], length: int = 20, bits: int = 64, seed: int = 0
            ) -> dict[str, Vector]:
    gen = np.random.default_rng(seed)
    return {n: gen.integers(0, 2**bits, length, dtype=np.uint64) for n in names}


@dataclass
class Staged:
    """A round run up to the share stage, for tests that go on by hand."""

    clients: dict[str, SecAggClient]
    roster: dict[str, KeyAdvert]
    outboxes: dict[str, dict[str, bytes]]
    threshold: int

    def inbox(self, name: str) -> dict[str, bytes]:
        return {v: boxes[name] for v, boxes in self.outboxes.items() if name in boxes}

    def mask_all(self, xs: dict[str, Vector]) -> dict[str, Vector]:
        return {n: self.clients[n].mask(xs[n], self.inbox(n)) for n in sorted(xs)}

    def unmask(self, masked: dict[str, Vector], reveals: dict[str, Reveal]) -> Vector:
        return unmask(masked, self.roster, frozenset(self.outboxes), reveals, self.threshold,
                      CONTEXT, Q)


def staged(names: list[str] = NAMES, threshold: int = 3, seed: int = 1) -> Staged:
    rng = seeded(seed)
    clients = {n: SecAggClient(n, CONTEXT, Q, rng) for n in names}
    roster = {n: c.advertise() for n, c in clients.items()}
    outboxes = {n: c.share_keys(roster, threshold) for n, c in clients.items()}
    return Staged(clients, roster, outboxes, threshold)


# -- whole rounds ------------------------------------------------------------------------


def test_a_round_of_five_without_dropouts_gives_the_exact_sum() -> None:
    xs = updates(NAMES)
    assert np.array_equal(simulate_round(xs, 3, CONTEXT, Q, rng=seeded(2)),
                          plain_sum(xs.values()))


def test_masked_vectors_do_not_show_the_updates() -> None:
    s = staged()
    xs = {n: np.zeros(20, dtype=np.uint64) for n in NAMES}
    masked = s.mask_all(xs)
    assert all(np.count_nonzero(y) >= 19 for y in masked.values())


def test_a_client_dropping_after_mask_is_removed_through_its_key_shares() -> None:
    s, xs = staged(), updates(NAMES)
    masked = s.mask_all(xs)
    del masked["c2"]  # computed, but it never reaches the server
    included, dropped = frozenset(masked), frozenset({"c2"})
    reveals = {n: s.clients[n].reveal(included, dropped) for n in sorted(included)}
    assert all(set(r.key_shares) == {"c2"} for r in reveals.values())
    assert all(set(r.self_mask_shares) == set(included) for r in reveals.values())
    assert np.array_equal(s.unmask(masked, reveals),
                          plain_sum(xs[n] for n in sorted(included)))


@pytest.mark.parametrize("fate", list(Fate))
def test_one_client_dropping_at_any_stage(fate: Fate) -> None:
    xs = updates(NAMES)
    out = simulate_round(xs, 3, CONTEXT, Q, fates={"c1": fate}, rng=seeded(3))
    summed = NAMES if fate is Fate.BEFORE_REVEAL else [n for n in NAMES if n != "c1"]
    assert np.array_equal(out, plain_sum(xs[n] for n in summed))


def test_too_few_reveals_abort_with_the_counts() -> None:
    fates = dict.fromkeys(["c0", "c1", "c2"], Fate.BEFORE_REVEAL)
    with pytest.raises(SecAggError, match="2 of 5 clients revealed, the threshold is 3"):
        simulate_round(updates(NAMES), 3, CONTEXT, Q, fates=fates)


def test_too_few_included_clients_make_each_client_refuse_to_reveal() -> None:
    fates = dict.fromkeys(["c0", "c1", "c2"], Fate.AFTER_MASK)
    with pytest.raises(SecAggError, match="2 clients of the neighbourhood of client 'c3' are "
                                          "included, the threshold is 3"):
        simulate_round(updates(NAMES), 3, CONTEXT, Q, fates=fates)


def test_too_few_senders_make_a_client_refuse_to_mask() -> None:
    fates = dict.fromkeys(["c0", "c1", "c2"], Fate.BEFORE_SHARE)
    with pytest.raises(SecAggError, match="2 clients of the neighbourhood of client 'c3' "
                                          r"\(itself included\) sent shares"):
        simulate_round(updates(NAMES), 3, CONTEXT, Q, fates=fates)


@pytest.mark.parametrize("bits", [1, 7, 32, 63])
def test_narrow_moduli_sum_exactly(bits: int) -> None:
    q = Quantization(bits=bits, frac_bits=0)
    xs = updates(NAMES, bits=bits)
    out = simulate_round(xs, 2, CONTEXT, q, fates={"c4": Fate.AFTER_MASK}, rng=seeded(4))
    assert np.array_equal(out, plain_sum((xs[n] for n in NAMES[:4]), bits))


# -- tampering and misrouting ------------------------------------------------------------


def test_a_tampered_box_is_refused_naming_its_sender() -> None:
    s = staged()
    inbox = s.inbox("c0")
    box = bytearray(inbox["c3"])
    box[40] ^= 1
    inbox["c3"] = bytes(box)
    with pytest.raises(SecAggError, match="from client 'c3' do not decrypt"):
        s.clients["c0"].mask(updates(["c0"])["c0"], inbox)


def test_a_box_delivered_to_the_wrong_client_or_round_is_refused() -> None:
    s = staged()
    inbox = s.inbox("c0")
    inbox["c1"] = s.outboxes["c1"]["c2"]  # meant for c2
    with pytest.raises(SecAggError, match="from client 'c1' do not decrypt"):
        s.clients["c0"].mask(updates(["c0"])["c0"], inbox)
    # The same seed gives c0 the same keys, so only the round context differs.
    late = SecAggClient("c0", b"round 8", Q, seeded(1))
    assert late.advertise() == s.roster["c0"]
    late.share_keys({**s.roster, "c0": late.advertise()}, 3)
    with pytest.raises(SecAggError, match="from client 'c1' do not decrypt"):
        late.mask(updates(["c0"])["c0"], {"c1": s.outboxes["c1"]["c0"]})


def test_boxes_from_strangers_and_truncated_boxes_are_refused() -> None:
    s = staged()
    x = updates(["c0"])["c0"]
    with pytest.raises(SecAggError, match="'c0' is not a neighbour of client 'c0'"):
        s.clients["c0"].mask(x, {"c0": s.outboxes["c1"]["c0"]})
    with pytest.raises(SecAggError, match="'zz' is not a neighbour of client 'c0'"):
        s.clients["c0"].mask(x, {"zz": s.outboxes["c1"]["c0"]})
    with pytest.raises(SecAggError, match="'c1' are not a box"):
        s.clients["c0"].mask(x, {"c1": b"short"})


def test_a_tampered_revealed_share_is_detected_beyond_the_threshold() -> None:
    s, xs = staged(), updates(NAMES)
    masked = s.mask_all(xs)
    reveals = {n: s.clients[n].reveal(frozenset(NAMES), frozenset()) for n in NAMES}
    share = share_from_bytes(reveals["c4"].self_mask_shares["c1"])
    forged = share_to_bytes(Share(share.x, (share.y + 1) % PRIME))
    reveals["c4"] = replace(reveals["c4"],
                            self_mask_shares={**reveals["c4"].self_mask_shares, "c1": forged})
    with pytest.raises(SecAggError, match=r"self-mask seed of client 'c1'.*tampered"):
        s.unmask(masked, reveals)


def test_a_tampered_key_share_is_detected_even_at_the_threshold() -> None:
    s, xs = staged(), updates(NAMES)
    masked = s.mask_all(xs)
    del masked["c0"], masked["c1"]
    included, dropped = frozenset(masked), frozenset({"c0", "c1"})
    reveals = {n: s.clients[n].reveal(included, dropped) for n in sorted(included)}
    share = share_from_bytes(reveals["c3"].key_shares["c0"])
    forged = share_to_bytes(Share(share.x, (share.y + 1) % PRIME))
    reveals["c3"] = replace(reveals["c3"], key_shares={**reveals["c3"].key_shares, "c0": forged})
    with pytest.raises(SecAggError, match=r"dropped client 'c0'.*(advert|fit)"):
        s.unmask(masked, reveals)


# -- the never-both guarantee and other refusals of reveal -------------------------------


def test_reveal_never_gives_both_kinds_of_share_for_one_client() -> None:
    s = staged()
    s.mask_all(updates(NAMES))
    client = s.clients["c0"]
    first = client.reveal(frozenset({"c0", "c1", "c2"}), frozenset({"c3", "c4"}))
    with pytest.raises(SecAggError,
                       match=r"already revealed the other kind of share of \['c2', 'c3'\]"):
        client.reveal(frozenset({"c0", "c1", "c3"}), frozenset({"c2", "c4"}))
    # The refusal changed nothing: the first answer can be given again.
    assert client.reveal(frozenset({"c0", "c1", "c2"}), frozenset({"c3", "c4"})) == first


@pytest.mark.parametrize(("included", "dropped", "match"), [
    ({"c0", "c1", "c2"}, {"c2"}, r"\['c2'\] are named both"),
    ({"c1", "c2", "c3"}, {"c0"}, "'c0' is not among the included"),
    ({"c0", "c1", "zz"}, set(), r"\['zz'\] are not in the roster"),
    ({"c0", "c1"}, {"c2"}, "2 clients of the neighbourhood of client 'c0' are included"),
])
def test_reveal_refuses_inconsistent_requests(included: set[str], dropped: set[str],
                                              match: str) -> None:
    s = staged()
    s.mask_all(updates(NAMES))
    with pytest.raises(SecAggError, match=match):
        s.clients["c0"].reveal(frozenset(included), frozenset(dropped))


def test_reveal_refuses_a_client_that_sent_no_box() -> None:
    s = staged()
    inbox = s.inbox("c0")
    del inbox["c4"]
    s.clients["c0"].mask(updates(["c0"])["c0"], inbox)
    with pytest.raises(SecAggError, match=r"\['c4'\] sent no shares to client 'c0'"):
        s.clients["c0"].reveal(frozenset({"c0", "c1", "c2"}), frozenset({"c4"}))


def test_stages_run_once_and_in_order() -> None:
    client = SecAggClient("c0", CONTEXT, Q)
    with pytest.raises(SecAggError, match="call share_keys first"):
        client.mask(np.zeros(3, dtype=np.uint64), {})
    other = SecAggClient("c1", CONTEXT, Q)
    roster = {"c0": client.advertise(), "c1": other.advertise()}
    client.share_keys(roster, 1)
    with pytest.raises(SecAggError, match="already shared"):
        client.share_keys(roster, 1)
    with pytest.raises(SecAggError, match="cannot reveal now"):
        client.reveal({"c0"}, set())
    client.mask(np.zeros(3, dtype=np.uint64), {})
    with pytest.raises(SecAggError, match="cannot mask now"):
        client.mask(np.zeros(3, dtype=np.uint64), {})


# -- refusals of share_keys, mask and unmask -------------------------------------------------


def test_share_keys_refuses_a_bad_roster_or_threshold() -> None:
    a, b = SecAggClient("a", CONTEXT, Q), SecAggClient("b", CONTEXT, Q)
    with pytest.raises(SecAggError, match="lacks client 'a'"):
        a.share_keys({"b": b.advertise()}, 1)
    with pytest.raises(SecAggError, match="'a' and 'b' advertise the same public key"):
        a.share_keys({"a": a.advertise(), "b": a.advertise()}, 1)
    roster = {"a": a.advertise(), "b": b.advertise()}
    with pytest.raises(SecAggError, match=r"threshold 3 is outside 1..2"):
        a.share_keys(roster, 3)
    with pytest.raises(SecAggError, match=r"\['zz'\] are not in the roster"):
        a.share_keys(roster, 1, frozenset({"zz"}))
    low_order = KeyAdvert(bytes(32), b"\x09" + bytes(31))
    with pytest.raises(SecAggError, match="key agreement with client 'b' failed"):
        a.share_keys({"a": a.advertise(), "b": low_order}, 1)
    assert len(a.share_keys(roster, 2)) == 1  # the refusals changed nothing


def test_mask_refuses_updates_that_are_not_vectors_below_the_modulus() -> None:
    s = staged()
    client = s.clients["c0"]
    for bad, match in [(np.zeros(3, dtype=np.int64), "uint64"),
                       (np.zeros((2, 2), dtype=np.uint64), "1-D"),
                       ([1, 2], "list")]:
        with pytest.raises(SecAggError, match=match):
            client.mask(bad, s.inbox("c0"))  # type: ignore[arg-type]
    narrow = SecAggClient("n", CONTEXT, Quantization(bits=8, frac_bits=0))
    narrow.share_keys({"n": narrow.advertise()}, 1)
    with pytest.raises(SecAggError, match="256 is not below 2\\*\\*8"):
        narrow.mask(np.array([256], dtype=np.uint64), {})


def test_unmask_refuses_inconsistent_or_malformed_input() -> None:
    s, xs = staged(), updates(NAMES)
    masked = s.mask_all(xs)
    reveals = {n: s.clients[n].reveal(frozenset(NAMES), frozenset()) for n in NAMES}

    def refused(match: str, masked: dict[str, Vector] = masked,
                reveals: dict[str, Reveal] = reveals) -> None:
        with pytest.raises(SecAggError, match=match):
            s.unmask(masked, reveals)

    refused("reveals from \\['c4'\\], which are not included",
            masked={n: masked[n] for n in NAMES[:4]})
    refused("'c2': 19 elements, expected 20", masked={**masked, "c2": masked["c2"][:-1]})
    good = reveals["c1"].self_mask_shares
    refused("client 'c1'.*of client 'c0': a share is 132 bytes, got 3",
            reveals={**reveals, "c1": Reveal({**good, "c0": b"abc"}, {})})
    refused("client 'c1'.*of client 'c0': index x=1, its index is 2",
            reveals={**reveals, "c1": Reveal({**good, "c0": good["c0"].replace(
                (2).to_bytes(66, "big"), (1).to_bytes(66, "big"), 1)}, {})})
    refused("client 'c1'.*mask key of client 'c0': it holds no such share",
            reveals={**reveals, "c1": Reveal(good, {"c0": good["c0"]})})
    with pytest.raises(SecAggError, match="vectors from \\['c0'\\], which sent no shares"):
        unmask(masked, s.roster, frozenset(NAMES[1:]), reveals, 3, CONTEXT, Q)
    with pytest.raises(SecAggError, match="no masked vectors"):
        unmask({}, s.roster, frozenset(NAMES), {}, 3, CONTEXT, Q)
    with pytest.raises(SecAggError, match="not symmetric"):
        unmask(masked, s.roster, frozenset(NAMES), reveals, 3, CONTEXT, Q,
               {"c0": frozenset({"c1"})})
    assert np.array_equal(s.unmask(masked, reveals), plain_sum(xs.values()))


def test_adverts_travel_as_64_bytes() -> None:
    advert = SecAggClient("a", CONTEXT, Q).advertise()
    assert advert_from_bytes(advert_to_bytes(advert)) == advert
    assert len(advert_to_bytes(advert)) == ADVERT_SIZE == 64
    with pytest.raises(SecAggError, match="a key advert is 64 bytes"):
        advert_from_bytes(bytes(63))
    with pytest.raises(SecAggError, match="c_pk: an X25519 public key is 32 bytes, got 31"):
        KeyAdvert(bytes(31), bytes(32))


# -- SecAgg+ ------------------------------------------------------------------------------


def test_the_secagg_plus_graph_is_symmetric_and_k_regular() -> None:
    names = [f"c{i:02}" for i in range(11)]
    graph = neighbours(names, 4, b"seed")
    assert set(graph) == set(names)
    assert all(len(hood) == 4 and name not in hood for name, hood in graph.items())
    assert all(u in graph[v] for u in names for v in graph[u])
    assert neighbours(list(reversed(names)), 4, b"seed") == graph
    assert neighbours(names, 4, b"other seed") != graph


def test_the_secagg_plus_graph_is_full_when_k_reaches_n_minus_one() -> None:
    graph = neighbours(NAMES, 4, b"s")
    assert graph == {n: frozenset(NAMES) - {n} for n in NAMES}
    for k in (0, 3, -2):
        with pytest.raises(SecAggError, match="must be even and at least 2"):
            neighbours(NAMES, k, b"s")


def test_a_secagg_plus_round_with_dropouts_gives_the_exact_sum() -> None:
    names = [f"c{i:02}" for i in range(12)]
    graph = neighbours(names, 6, b"round seed")
    xs = updates(names, length=50)
    fates = {"c03": Fate.AFTER_MASK, "c07": Fate.BEFORE_MASK}
    out = simulate_round(xs, 4, CONTEXT, Q, graph=graph, fates=fates, rng=seeded(5))
    assert np.array_equal(out, plain_sum(xs[n] for n in names if n not in fates))


def test_threshold_for_is_a_strict_majority() -> None:
    assert [threshold_for(n) for n in (1, 2, 3, 4, 5, 10)] == [1, 2, 2, 3, 3, 6]
    with pytest.raises(SecAggError):
        threshold_for(0)


# -- primitives -----------------------------------------------------------------------------


def test_pairwise_keys_agree_and_are_bound_to_purpose_and_round() -> None:
    rng = seeded(6)
    a, b = new_private_key(rng), new_private_key(rng)
    ab = agree(a, public_bytes(b), "b", LABEL_MASK, CONTEXT)
    assert ab == agree(b, public_bytes(a), "a", LABEL_MASK, CONTEXT)
    assert ab != agree(a, public_bytes(b), "b", LABEL_SHARE, CONTEXT)
    assert ab != agree(a, public_bytes(b), "b", LABEL_MASK, b"round 8")


def test_the_mask_stream_is_chacha20_from_a_zero_nonce() -> None:
    # RFC 7539 section 2.4.2's first block for an all-zero key, nonce and
    # counter starts 76 b8 e0 ad a0 f1 3d 90 (read here as little-endian).
    assert int(expand(bytes(32), 1, 64)[0]) == 0x903DF1A0ADE0B876
    assert int(expand(bytes(32), 1, 12)[0]) == 0x876
    assert np.array_equal(expand(b"k" * 32, 5, 64)[:3], expand(b"k" * 32, 3, 64))


def test_the_smaller_name_adds_the_pairwise_mask() -> None:
    assert pair_sign("a", "b") == 1
    assert pair_sign("b", "a") == -1


# -- quantisation -----------------------------------------------------------------------------


def model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen).half(),
            "steps": torch.tensor(10 + seed), "mask": torch.tensor([True, seed % 2 == 0]),
            "empty": torch.zeros(0)}


def test_one_update_round_trips_within_half_a_step() -> None:
    sd = model(0)
    names = list(sd)
    out = dequantize(quantize(sd, names, 3, Q, 1), spec_of(sd), Q)
    step = 2.0 ** -Q.frac_bits
    assert torch.allclose(out["w"].double(), sd["w"].double(), rtol=0, atol=step / 2)
    assert torch.equal(out["b"], sd["b"])  # float16 holds far fewer bits than 24
    assert torch.equal(out["steps"], sd["steps"])
    assert torch.equal(out["mask"], sd["mask"])
    assert out["empty"].shape == (0,)


def test_the_secure_sum_decodes_to_the_weighted_mean() -> None:
    sds, weights = {f"c{i}": model(i) for i in range(4)}, {"c0": 1, "c1": 2, "c2": 3, "c3": 4}
    names = list(sds["c0"])
    xs = {c: quantize(sds[c], names, weights[c], Q, 4) for c in sds}
    out = dequantize(simulate_round(xs, 3, CONTEXT, Q, rng=seeded(7)), spec_of(sds["c0"]), Q)
    mean = torch.stack([weights[c] * sds[c]["w"].double() for c in sds]).sum(0) / 10
    assert torch.allclose(out["w"].double(), mean, rtol=0, atol=2.0 ** -Q.frac_bits)
    assert out["steps"].item() == round((1 * 10 + 2 * 11 + 3 * 12 + 4 * 13) / 10)
    assert out["mask"].tolist() == [True, False]  # True weighs 4 of 10 in the second


def test_values_are_clipped_and_non_finite_values_are_named() -> None:
    q = Quantization(clip=2.0)
    vec = quantize({"w": torch.tensor([5.0, -7.0, 1.5])}, ["w"], 1, q, 1)
    out = dequantize(vec, spec_of({"w": torch.zeros(3)}), q)
    assert out["w"].tolist() == [2.0, -2.0, 1.5]
    with pytest.raises(SecAggError, match="tensor 'w': contains NaN or Inf"):
        quantize({"w": torch.tensor([1.0, float("nan")])}, ["w"], 1, q, 1)
    with pytest.raises(SecAggError, match=r"missing \['v'\], unexpected \['w'\]"):
        quantize({"w": torch.zeros(1)}, ["v"], 1, q, 1)


def test_the_headroom_check_names_what_to_lower() -> None:
    check_headroom(2**10, 2**15, Q)  # 2**(10 + 12 + 24 + 15) = 2**61 < 2**63
    with pytest.raises(SecAggError, match=r"no headroom.*lower clip, frac_bits or the weight"):
        check_headroom(2**12, 2**15, Q)
    with pytest.raises(SecAggError, match="no headroom"):
        quantize({"w": torch.zeros(1)}, ["w"], 2**12, Q, 2**15)
    with pytest.raises(SecAggError, match="weight must be a non-negative integer"):
        check_headroom(-1, 1, Q)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bits": 0}, "bits must be"), ({"bits": 65}, "bits must be"),
    ({"frac_bits": 64}, "frac_bits must be"), ({"bits": 8, "frac_bits": 8}, "frac_bits"),
    ({"clip": 0.0}, "clip must be"), ({"clip": float("inf")}, "clip must be"),
])
def test_quantization_settings_are_validated(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        Quantization(**kwargs)  # type: ignore[arg-type]


def test_dequantize_refuses_a_zero_weight_or_a_wrong_length() -> None:
    specs = spec_of({"w": torch.zeros(2)})
    with pytest.raises(SecAggError, match="total weight is 0"):
        dequantize(np.zeros(3, dtype=np.uint64), specs, Q)
    with pytest.raises(SecAggError, match="2 elements, the specs need 3"):
        dequantize(np.ones(2, dtype=np.uint64), specs, Q)


# -- purity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("modules", "forbidden"), [
    ("paramserver.secagg, paramserver.secagg_sim, paramserver.quantize",
     ("grpc", "google")),
    ("paramserver.secagg_messages", ("grpc", "torch")),
    ("paramserver.shamir", ("grpc", "torch", "numpy", "cryptography")),
])
def test_secure_aggregation_loads_no_transport(modules: str, forbidden: tuple[str, ...]) -> None:
    # A fresh interpreter: this test process may have grpc loaded already.
    code = (f"import sys, {modules}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]", f"{modules} load {out}"
