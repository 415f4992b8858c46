"""The public API in-process: a whole experiment in one call, a server as a
context manager, the history read back, and a checkpoint exported in
standard formats that equals the server's model bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import paramserver as ps
from paramserver import codec, results, tasks


def small_task() -> tasks.Builtin:
    return tasks.Builtin("mlp", "generated", examples=40, test_examples=50)


def test_run_experiment_returns_the_history(tmp_path: Path) -> None:
    history = ps.run_experiment(small_task(), clients=2, rounds=2, run_dir=tmp_path / "run")
    assert [(r.round, r.num_updates) for r in history.rounds] == [(1, 2), (2, 2)]
    assert codec.state_dict_digest(history.final_state_dict).hex() == history.final_sha256
    assert all(0 <= a <= 1 for a in history.accuracy())
    assert set(history.clients) == {"client0", "client1"}
    assert ps.read_history(tmp_path / "run").rounds == history.rounds
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("kind,round,num_updates")


def test_the_same_seed_gives_the_same_final_model(tmp_path: Path) -> None:
    first = ps.run_experiment(small_task(), clients=2, rounds=2, seed=3)
    second = ps.run_experiment(small_task(), clients=2, rounds=2, seed=3)
    assert first.final_sha256 == second.final_sha256


def test_serve_and_run_client(tmp_path: Path) -> None:
    factory = small_task()
    model = factory(ps.TaskContext(None, 0, 1, 0)).model()
    with ps.serve(model, clients=1, rounds=1, run_dir=tmp_path) as server:
        summary = ps.run_client(server.address, factory(ps.TaskContext("solo", 0, 1, 0)), "solo")
        final = server.model()
    assert summary.rounds[1] == codec.state_dict_digest(final).hex()


def test_an_export_loads_as_torch_and_safetensors_with_the_same_digest(tmp_path: Path) -> None:
    history = ps.run_experiment(small_task(), clients=2, rounds=2, run_dir=tmp_path / "run")
    state_dir = tmp_path / "run" / "state"
    written = results.export(state_dir, tmp_path / "final")
    assert [p.name for p in written] == ["final.safetensors", "final.pt"]
    loaded = torch.load(tmp_path / "final.pt", weights_only=True)
    assert codec.state_dict_digest(loaded).hex() == history.final_sha256
    tensors = load_file(str(tmp_path / "final.safetensors"))
    with safe_open(str(tmp_path / "final.safetensors"), "pt") as f:
        metadata = f.metadata()
    ordered = {name: tensors[name] for name in json.loads(metadata["tensors"])}
    assert codec.state_dict_digest(ordered).hex() == history.final_sha256
    assert (metadata["round"], metadata["sha256"]) == ("2", history.final_sha256)
    previous = results.export(state_dir, tmp_path / "one.pt", round=1)[0]
    assert codec.state_dict_digest(torch.load(previous, weights_only=True)).hex() == \
        history.rounds[0].sha256
    with pytest.raises(results.ResultsError, match="keeps the models of rounds 1, 2, not 7"):
        results.export(state_dir, tmp_path / "x.pt", round=7)
    with pytest.raises(results.ResultsError, match="not a paramserver state dir"):
        results.export(tmp_path, tmp_path / "x.pt")


def test_plot_draws_several_runs_in_one_chart(tmp_path: Path) -> None:
    for name in ("a", "b"):
        ps.run_experiment(small_task(), clients=2, rounds=2, run_dir=tmp_path / name)
    out = results.plot([tmp_path / "a", tmp_path / "b"], tmp_path / "chart.png", "two runs")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(results.ResultsError, match="not a run directory"):
        results.plot([tmp_path / "nothing"], tmp_path / "x.png")


def test_secure_aggregation_in_process_is_close_to_plain_fedavg(tmp_path: Path) -> None:
    """The same run with and without secure aggregation, in-process: the
    models differ only by the fixed-point quantisation (2**-24 here). (That
    the secure model is exactly the dequantised sum of the clients'
    quantised updates is checked with real processes in the integration
    tests.)"""
    from paramserver.config import SecAggSettings
    from paramserver.quantize import Quantization

    plain = ps.run_experiment(small_task(), clients=3, rounds=1, seed=1)
    secure = ps.run_experiment(small_task(), clients=3, rounds=1, seed=1,
                               secagg=SecAggSettings(Quantization()), round_timeout=60.0)
    assert secure.rounds[0].num_updates == 3
    for name, value in plain.final_state_dict.items():
        assert torch.allclose(secure.final_state_dict[name], value, atol=2**-20), name
    assert secure.final_sha256 != plain.final_sha256  # quantised, so not bit-equal
