"""Secure aggregation with real processes: five clients, one of them killed
with kill -9 right after its masked update was acknowledged (before it could
confirm): the round's model is the plain FedAvg of the four survivors'
quantised updates, bit for bit, and the run goes on."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from paramserver import codec, training
from paramserver.faults import CRASH_ENV
from paramserver.quantize import Quantization, dequantize
from paramserver.secagg_masks import plain_sum

from .harness import ClientFactory, ServerFactory

EXIT_TIMEOUT = 180.0
SURVIVORS = ("c1", "c2", "c3", "c4")
VICTIM = "c5"


def fedavg_of_quantized(vectors: list[np.ndarray], q: Quantization) -> str:
    """The digest of the model the server must publish: the survivors'
    quantised updates summed mod 2**bits, divided by their total weight."""
    specs = codec.spec_of(training.build_model("mlp", 0).state_dict())
    model = dequantize(plain_sum(vectors, q.bits), list(specs), q)
    return hashlib.sha256(b"".join(bytes(v) for v in codec.payload_views(model))).hexdigest()


@pytest.mark.timeout(400)
def test_a_client_killed_after_its_masked_update_is_dropped_and_the_sum_is_exact(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path) -> None:
    # Round 2 waits --secagg-timeout for the dead client's keys, then leaves
    # it out (and the barrier stops waiting for it).
    server = server_factory("--secagg", "--round-timeout", "60", "--secagg-timeout", "5",
                            "--linger", "5", "--min-clients", "3", clients=5, rounds=2)
    saved = tmp_path / "quantized"
    clients = [client_factory(name, server, "--save-quantized", str(saved))
               for name in SURVIVORS]
    victim = client_factory(VICTIM, server, "--save-quantized", str(saved),
                            env={CRASH_ENV: "client_after_masked:1"})
    assert victim.wait(EXIT_TIMEOUT) == -9, victim.log()
    for client in clients:
        assert client.wait(EXIT_TIMEOUT) == 0, client.log()
    first, second = server.wait_for_rounds(2)
    assert (first["num_updates"], second["num_updates"]) == (4, 4), (first, second)

    q = Quantization()
    vectors = [np.load(saved / f"{name}-round-1.npy", allow_pickle=False)
               for name in SURVIVORS]
    assert first["sha256"] == fedavg_of_quantized(vectors, q)
    assert first["total_examples"] == sum(int(v[-1]) for v in vectors)
    # The victim's update was masked and sent, and is in none of the sums.
    assert (saved / f"{VICTIM}-round-1.npy").exists()
    assert re.search(rf"round 1: 4 clients summed securely, \['{VICTIM}'\] dropped",
                     server.log()), server.log()
    for client in clients:
        assert client.summary()["rounds"]["1"] == first["sha256"]
        assert client.summary()["rounds"]["2"] == second["sha256"]
    # What the server keeps on disk (round 2's updates) is masked: no
    # survivor's quantised update appears in it.
    plain = [np.load(saved / f"{name}-round-2.npy", allow_pickle=False).tobytes()[:4096]
             for name in SURVIVORS]
    spooled = server.spool_files()
    assert len(spooled) == 4, spooled
    for path in spooled:
        data = path.read_bytes()
        assert not any(chunk in data for chunk in plain), path


@pytest.mark.timeout(300)
def test_fewer_than_the_threshold_abort_the_round_clearly(
        server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """Three clients, threshold 3, one killed after its masked update: the
    round is aborted with a message that says why, the global model stays
    (the one-round run ends with the initial model) and the survivors exit
    cleanly."""
    server = server_factory("--secagg", "--secagg-threshold", "3", "--round-timeout", "20",
                            "--linger", "5", "--min-clients", "2", clients=3, rounds=1)
    survivors = [client_factory(name, server) for name in ("c1", "c2")]
    victim = client_factory("c3", server, env={CRASH_ENV: "client_after_masked:1"})
    assert victim.wait(EXIT_TIMEOUT) == -9, victim.log()
    server.wait_for_log(r"round 1 aborted: secure aggregation of round 1 aborted: 2 of 3 "
                        r"clients confirmed their masked updates, the threshold is 3",
                        timeout=EXIT_TIMEOUT)
    for client in survivors:
        assert client.wait(EXIT_TIMEOUT) == 0, client.log()
        assert "aborted" in client.log()
        assert client.summary()["rounds"] == {}, client.log()  # no model averaged it
    assert server.rounds() == []


@pytest.mark.timeout(300)
def test_secagg_plus_on_a_sparse_graph_sums_exactly(
        server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path) -> None:
    """SecAgg+ (each client masks with and shares to 2 neighbours of 5): the
    model is still the exact FedAvg of the quantised updates."""
    server = server_factory("--secagg", "--secagg-neighbours", "2", "--round-timeout", "60",
                            "--linger", "5", clients=5, rounds=1)
    saved = tmp_path / "quantized"
    names = [f"c{i}" for i in range(1, 6)]
    clients = [client_factory(name, server, "--save-quantized", str(saved)) for name in names]
    for client in clients:
        assert client.wait(EXIT_TIMEOUT) == 0, client.log()
    [record] = server.wait_for_rounds(1)
    vectors = [np.load(saved / f"{name}-round-1.npy", allow_pickle=False) for name in names]
    assert record["num_updates"] == 5
    assert record["sha256"] == fedavg_of_quantized(vectors, Quantization())
