import hashlib
from pathlib import Path

import pytest
import torch

from paramserver import codec
from paramserver.state import MODEL_FILE, PREVIOUS_MODEL_FILE, StateDir, StateDirError


def model(round: int) -> tuple[codec.ModelHeader, bytes]:
    sd = {"w": torch.full((3,), float(round))}
    payload = b"".join(codec.payload_views(sd))
    return codec.ModelHeader(round, codec.spec_of(sd), hashlib.sha256(payload).digest()), payload


def test_model_round_trip_and_previous_version(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.load_model() is None
    for round in (1, 2):
        state.save_model(*model(round))
    loaded = state.load_model()
    assert loaded is not None
    assert loaded.header == model(2)[0]
    assert loaded.payload == model(2)[1]
    assert (tmp_path / PREVIOUS_MODEL_FILE).exists()


def test_corrupt_latest_model_falls_back_to_previous(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save_model(*model(1))
    state.save_model(*model(2))
    data = bytearray((tmp_path / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / MODEL_FILE).write_bytes(bytes(data))
    loaded = state.load_model()
    assert loaded is not None
    assert loaded.header.round == 1


def test_crash_between_renames_leaves_the_previous_model(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save_model(*model(1))

    def crash() -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL at this point

    with pytest.raises(KeyboardInterrupt):
        state.save_model(*model(2), crash=crash)
    loaded = state.load_model()
    assert loaded is not None
    assert loaded.header.round == 1


def test_one_server_per_state_dir_and_one_run(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    with pytest.raises(StateDirError, match="in use"):
        StateDir(tmp_path)
    state.check_run({"initial_sha256": "aa"})
    state.check_run({"initial_sha256": "aa"})
    with pytest.raises(StateDirError, match="another run"):
        state.check_run({"initial_sha256": "bb"})
    state.save_clients({"c1": 1, "c2": 3})
    assert state.load_clients() == {"c1": 1, "c2": 3}
    state.close()
    StateDir(tmp_path).close()  # the lock is released
